"""The dream stage: EPO per (target, seed), merged frontiers, token attribution, DuckDB writes.

Compute (:func:`dream_target`, :func:`merge_results`) is pure and returns picklable
:class:`DreamResult` objects, so a Ray worker can compute and the driver writes
(:func:`write_dream`, the only function here that touches the store).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Callable, Sequence

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ConfigError, ReverieError
from reverie.pipeline.store import Store, now
from reverie.sae_targets.loading import Subject, check_latents
from reverie.sae_targets.objectives import Objective, build_objective
from reverie.sae_targets.selection import Target
from reverie.stages.dream.attribution import token_attribution
from reverie.stages.dream.epo import DreamJob, IterationStats, run_epo_batch
from reverie.stages.dream.evaluator import PromptEvaluator
from reverie.stages.dream.pareto import frontier_of
from reverie.stages.dream.result import DreamResult


def objective_scales(subject: Subject, objectives: Sequence[Objective], mode: str, n_tokens: int, n_prompts: int = 1024,
                     dataset_max: dict[int, float] | None = None) -> list[Objective | float]:
    """Scale each objective so λ means the same for every objective (issue: one scale for every
    objective; paper §5 warns that λ must match the objective's units).

    * ``'z'``: σ of the objective over ``n_prompts`` random prompts of ``n_tokens`` tokens (the
      scan's random-prompt baseline, paper §3.5 eq. 5, same prompts and seed), so L_λ is in
      z-score units; an lp combination first divides each member latent by its own σ.
    * ``'dataset_max'``: each latent's maximum activation in the scan (``dataset_max``);
      combinations divide each member by its own and are then unscaled.
    * ``'raw'``: 1 (λ in the objective's own units).

    Args:
        objectives: one per job; combinations are rebuilt with member ``scales``.
        dataset_max: latent id → the scan's max activation (required for 'dataset_max').
    Returns:
        ``[(objective, scale), ...]``: the (possibly rebuilt) objective and its positive scale
        (σ below 1e-6 falls back to 1: a constant objective has no scale).
    Raises:
        ConfigError: unknown mode, or 'dataset_max' without a scan maximum for a latent.
    """
    from reverie.sae_targets.baseline import BASELINE_SEED, baselines, random_prompts

    if mode == "raw":
        return [(o, 1.0) for o in objectives]
    if mode == "dataset_max":
        missing = sorted({i for o in objectives for i in o.latents if not (dataset_max or {}).get(i)})
        if missing:
            raise ConfigError(f"dream.objective_scale = 'dataset_max' needs the scan's maximum of latents {missing}; "
                              "run `reverie scan` first (the nightly does), or use dream.objective_scale = 'z'")
        out = []
        for o in objectives:
            if o.combine is None:
                out.append((o, float(dataset_max[o.latents[0]])))
            else:
                out.append((replace(o, scales=[float(dataset_max[i]) for i in o.latents], scale_tag="dataset_max"), 1.0))
        return out
    if mode != "z":
        raise ConfigError(f"dream.objective_scale = {mode!r}: use 'z', 'dataset_max' or 'raw'")
    prompts = random_prompts(subject, n_prompts, n_tokens, BASELINE_SEED)
    members = sorted({(i, o.quantity, o.reduce) for o in objectives if o.combine is not None for i in o.latents})
    member_obj = [Objective(sae=subject.sae, latents=[i], quantity=q, reduce=r) for i, q, r in members]
    sigma = {m: b.std for m, b in zip(members, baselines(subject, prompts, member_obj))} if members else {}
    rebuilt = [o if o.combine is None else replace(o, scales=[_positive(sigma[(i, o.quantity, o.reduce)]) for i in o.latents], scale_tag="z")
               for o in objectives]
    return [(o, _positive(b.std)) for o, b in zip(rebuilt, baselines(subject, prompts, rebuilt))]


def _positive(x: float) -> float:
    return float(x) if x is not None and x > 1e-6 else 1.0


def dream_targets(cfg: ReverieConfig, subject: Subject, targets: Sequence[Target], seeds: Sequence[int] | None = None,
                  progress: Callable[[IterationStats], None] | None = None, dataset_max: dict[int, float] | None = None,
                  should_stop: Callable[[], None] | None = None) -> list[list[DreamResult]]:
    """Dream every target × seed as batched EPO searches (``dream.batch_targets`` jobs at a time;
    default: as many as fit ``dream.batch_memory_mb``), then token attribution. No DB access.

    Each job optimizes its objective divided by its scale (``dream.objective_scale``, see
    :func:`objective_scales`); stored values stay in the latent's own units. ``quantity = 'post'``
    is optimized through its pre-activation (post is flat at 0 while the latent is off, so it has
    no gradient there) and the frontier is then re-read and reported as post-activation.

    Returns:
        One list per target (in order) of one :class:`DreamResult` per seed (CPU; picklable).
    Raises:
        TargetError: a latent id outside the SAE.
        ConfigError: see :func:`objective_scales` and :func:`stages.dream.epo.run_epo_batch`.
    """
    seeds = list(cfg.dream.seeds if seeds is None else seeds)
    for t in targets:
        check_latents(list(t.latents), subject.d_sae)
    reported = [build_objective(subject.sae, t, cfg.targets) for t in targets]
    optimized = [replace(o, quantity="pre") if o.quantity == "post" else o for o in reported]
    scaled = objective_scales(subject, optimized, cfg.dream.objective_scale, cfg.dream.n_tokens, cfg.scan.baseline_prompts, dataset_max)
    reported = [replace(r, scales=o.scales, scale_tag=o.scale_tag) for r, (o, _) in zip(reported, scaled)]
    jobs = [(ti, DreamJob(o, int(s), sc, cfg.dream.objective_scale)) for ti, (o, sc) in enumerate(scaled) for s in seeds]
    per_batch = cfg.dream.batch_targets or batch_capacity(subject, cfg.dream)
    out: list[list[DreamResult]] = [[] for _ in targets]
    for lo in range(0, len(jobs), per_batch):
        chunk = jobs[lo: lo + per_batch]
        results = run_epo_batch(subject, [j for _, j in chunk], cfg.dream, progress, should_stop)
        for (ti, _), r in zip(chunk, results):
            if reported[ti].quantity != optimized[ti].quantity:
                r = _report_as(subject, reported[ti], cfg.dream, r)
            r.target_id = targets[ti].target_id
            dmax = (dataset_max or {}).get(targets[ti].latents[0]) if not targets[ti].is_combination else None
            _attribute(cfg, subject, reported[ti], r, dmax)
            out[ti].append(r)
    return out


def batch_capacity(subject: Subject, ecfg) -> int:
    """Jobs one batched search holds within ``ecfg.batch_memory_mb``: per job, the parents'
    log-probs and gradients (2 × M × n × V float32), their keys/values (2 × layers × M × T ×
    d_model float32) and top-k ids (M × n × k int64), doubled for temporaries."""
    mc = subject.model.cfg
    M, n, V = ecfg.population, ecfg.n_tokens, subject.vocab_size
    per_job = 4 * (2 * M * n * V + 2 * mc.n_layers * M * (n + 8) * mc.d_model) + 8 * M * n * min(ecfg.topk, V)
    return max(1, int(ecfg.batch_memory_mb * 2**20 // (2 * per_job)))


def _report_as(subject: Subject, objective: Objective, ecfg, r: DreamResult) -> DreamResult:
    """Re-read a frontier optimized through the pre-activation as ``objective`` (post) and keep
    its Pareto frontier in those units."""
    import torch

    ev = PromptEvaluator(subject, objective, ecfg)
    toks = torch.tensor([p.token_ids for p in r.frontier], dtype=torch.long)
    acts = ev.evaluate(toks).act.tolist()
    per, lat = ev.details(toks)
    prompts = []
    for i, p in enumerate(r.frontier):
        prompts.append(replace(p, activation=float(acts[i]), token_acts=per[i].tolist(), latent_acts=lat[i].tolist()))
    r.frontier = sorted(frontier_of(prompts, [p.activation for p in prompts], [p.ce for p in prompts], [tuple(p.token_ids) for p in prompts]),
                        key=lambda p: -p.activation)
    r.objective_key = objective.key
    r.objective = f"{objective.describe()} (optimized through its pre-activation)"
    return r


def attribution_prompts(frontier: Sequence, n: int, data_max: float | None = None) -> list:
    """Which frontier prompts get token attribution (paper Fig. 1 shows fluent prompts, not the
    gibberish at the top of the activation axis): first the most fluent (lowest CE) prompt whose
    activation beats ``data_max`` (the dataset's best window fed alone), then the
    highest-activation prompt (the one that comes closest when none beats it), then further
    beating prompts by CE, then the rest by activation; at most ``n``."""
    if n <= 0 or not frontier:
        return []
    winners = sorted((p for p in frontier if data_max is not None and p.activation > data_max), key=lambda p: p.ce)
    order = winners[:1] + [max(frontier, key=lambda p: p.activation)] + winners[1:] + sorted(frontier, key=lambda p: -p.activation)
    out, seen = [], set()
    for p in order:
        if tuple(p.token_ids) not in seen:
            seen.add(tuple(p.token_ids))
            out.append(p)
    return out[:n]


def _attribute(cfg: ReverieConfig, subject: Subject, objective: Objective, result: DreamResult, data_max: float | None = None) -> None:
    chosen = attribution_prompts(result.frontier, cfg.dream.attribution_prompts, data_max)
    if chosen:
        ev = PromptEvaluator(subject, objective, cfg.dream)
        for p in chosen:
            result.attributions[tuple(p.token_ids)] = token_attribution(ev, p.token_ids, cfg.dream.attribution_topk)


def dream_target(cfg: ReverieConfig, subject: Subject, target: Target, seed: int,
                 progress: Callable[[IterationStats], None] | None = None, dataset_max: dict[int, float] | None = None) -> DreamResult:
    """Dream one target with one seed (:func:`dream_targets` with one job). No DB access.

    Returns:
        :class:`DreamResult` (CPU only; picklable).
    Raises:
        TargetError: a latent id outside the SAE.
        ConfigError: see :func:`dream_targets`.
    """
    return dream_targets(cfg, subject, [target], [seed], progress, dataset_max)[0][0]


def merge_results(results: list[DreamResult]) -> DreamResult:
    """Merge several seeds of one target into one frontier (dedup by token ids, then the exact
    non-dominated set). Histories, restarts and attributions are kept per seed; counts and wall
    times add up.

    Raises:
        ReverieError: empty list, or results of different targets/objectives.
    """
    if not results:
        raise ReverieError("merge_results: no results to merge")
    keys = {(r.target_id, r.objective_key) for r in results}
    if len(keys) > 1:
        raise ReverieError(f"merge_results: results of different targets/objectives {sorted(keys)}; merge one target at a time")
    prompts = [p for r in results for p in r.frontier]
    frontier = frontier_of(prompts, [p.activation for p in prompts], [p.ce for p in prompts], [tuple(p.token_ids) for p in prompts])
    attributions = {}
    for r in results:
        for k, v in r.attributions.items():
            attributions.setdefault(k, v)
    timing: dict[str, float] = {}
    for r in results:
        for k, v in r.timing.items():
            timing[k] = timing.get(k, 0.0) + v
    r0 = results[0]
    return DreamResult(
        target_id=r0.target_id, latents=r0.latents, combine=r0.combine, objective_key=r0.objective_key, objective=r0.objective,
        seed=None, seeds=sorted({s for r in results for s in r.seeds}), config=r0.config, frontier=frontier,
        history=[h for r in results for h in r.history], attributions=attributions, restarts=[e for r in results for e in r.restarts],
        n_iterations=max(r.n_iterations for r in results), n_candidates=sum(r.n_candidates for r in results),
        wall_s=sum(r.wall_s for r in results), timing=timing,
        stop_reason=",".join(sorted({r.stop_reason for r in results})),
        objective_scale=r0.objective_scale, scale=r0.scale, batch_jobs=max(r.batch_jobs for r in results),
    )


def dream_id_for(run_id: str, target_id: str, seed: int) -> str:
    """'<run_id>/<target_id>/seed<seed>'."""
    return f"{run_id}/{target_id}/seed{seed}"


def write_dream(store: Store, run_id: str, target: Target, result: DreamResult) -> str:
    """Write one (run, target, seed) dream: ``dream_runs``, ``dream_prompts``, ``dream_history``,
    ``dream_attributions``, replacing earlier rows of that dream in one transaction (idempotent).

    Returns:
        The dream id.
    Raises:
        ReverieError: a merged result (write each seed's result instead), or a target mismatch.
    """
    if result.seed is None:
        raise ReverieError("write_dream stores one seed per dream run; write each seed's DreamResult, not a merged one")
    if result.target_id != target.target_id:
        raise ReverieError(f"write_dream: result is for target {result.target_id!r}, not {target.target_id!r}")
    dream_id = dream_id_for(run_id, target.target_id, result.seed)
    where = {"dream_id": dream_id}
    run_row = {
        "dream_id": dream_id, "run_id": run_id, "target_id": target.target_id, "seed": int(result.seed),
        "objective": result.objective, "config_json": json.dumps(result.config, sort_keys=True),
        "n_iterations": int(result.n_iterations), "n_candidates": int(result.n_candidates), "wall_s": float(result.wall_s),
        "created_at": now(), "objective_key": result.objective_key, "stop_reason": result.stop_reason,
        "timing_json": json.dumps(result.timing, sort_keys=True),
        "objective_scale": result.objective_scale, "scale": float(result.scale), "batch_jobs": int(result.batch_jobs),
    }
    prompts, attrs = [], []
    for idx, p in enumerate(result.frontier):
        prompts.append({
            "dream_id": dream_id, "idx": idx, "token_ids": [int(i) for i in p.token_ids], "tokens": list(p.tokens), "text": p.text,
            "activation": float(p.activation), "ce": float(p.ce), "perplexity": float(math.exp(min(p.ce, 700.0))),
            "lam": None if p.lam is None else float(p.lam), "iteration": int(p.iteration),
            "ce_rest": None if p.ce_rest is None else float(p.ce_rest),
            "token_acts": [float(x) for x in p.token_acts], "latent_acts": [float(x) for x in p.latent_acts],
        })
        for a in result.attributions.get(tuple(p.token_ids), []):
            attrs.append({
                "dream_id": dream_id, "idx": idx, "position": a.position, "token_id": a.token_id, "token": a.token,
                "drop_worst": float(a.drop_worst), "drop_best": float(a.drop_best),
                "replacements_json": json.dumps([{"token": x.token, "token_id": x.token_id, "activation": x.activation} for x in a.replacements]),
            })
    history = [
        {"dream_id": dream_id, "iteration": int(h.iteration), "activation": float(a), "ce": float(c)}
        for h in result.history for a, c in zip(h.activation, h.ce)
    ]
    with store.transaction():
        store.replace("dream_runs", where, [run_row])
        store.replace("dream_prompts", where, prompts)
        store.replace("dream_history", where, history)
        store.replace("dream_attributions", where, attrs)
    return dream_id


def run_dream_stage(cfg: ReverieConfig, subject: Subject, store: Store, run_id: str, targets: list[Target],
                    dataset_max: dict[int, float] | None = None) -> list[DreamResult]:
    """Dream every target × ``cfg.dream.seeds`` in this process as batched EPO searches
    (:func:`dream_targets`) with one tqdm progress bar per batch (iteration, frontier size,
    candidates/s), then write every (target, seed). Stops at the next iteration on SIGINT/SIGTERM
    (``pipeline.signals.check_interrupt``).

    Returns:
        One :class:`DreamResult` per (target, seed), targets in order, seeds in config order
        (merge a target's seeds with :func:`merge_results`).
    """
    from tqdm.auto import tqdm

    from reverie.pipeline.signals import check_interrupt

    n_jobs = len(targets) * len(cfg.dream.seeds)
    with tqdm(total=cfg.dream.iterations, desc=f"dream {len(targets)} target(s) × {len(cfg.dream.seeds)} seed(s)", unit="it", leave=True) as bar:
        def progress(s: IterationStats) -> None:
            if s.iteration < bar.n:      # the next batch started
                bar.reset()
            bar.update(s.iteration - bar.n)
            bar.set_postfix(frontier=s.frontier_size, cand_s=f"{s.candidates_per_s:.0f}", jobs=n_jobs, refresh=False)

        per_target = dream_targets(cfg, subject, targets, None, progress, dataset_max, check_interrupt)
    out: list[DreamResult] = []
    for target, results in zip(targets, per_target):
        for result in results:
            write_dream(store, run_id, target, result)
            out.append(result)
    return out


def _escape(text: str) -> str:
    """Terminal-safe text: control characters and newlines escaped (model text is untrusted)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def format_frontier(result: DreamResult, max_rows: int = 30, width: int = 70) -> str:
    """The frontier as a text table: rank, activation, CE (nats/token), perplexity, λ, iteration, seed, text."""
    lines = [f"target {result.target_id}: {result.objective}  ({len(result.frontier)} frontier prompts, "
             f"{result.n_candidates} candidates, {result.wall_s:.1f} s, seeds {result.seeds})",
             f"{'#':>3} {'activation':>11} {'CE':>6} {'ppl':>9} {'λ':>6} {'iter':>5} {'seed':>4}  text"]
    for i, p in enumerate(result.frontier[:max_rows]):
        text = _escape(p.text)
        text = text if len(text) <= width else text[: width - 1] + "…"
        lam = f"{p.lam:.3g}" if p.lam is not None else "-"
        lines.append(f"{i:>3} {p.activation:>11.4g} {p.ce:>6.2f} {p.perplexity:>9.4g} {lam:>6} {p.iteration:>5} {p.seed:>4}  {text}")
    return "\n".join(lines)
