"""The dream stage: EPO per (target, seed), merged frontiers, token attribution, DuckDB writes.

Compute (:func:`dream_target`, :func:`merge_results`) is pure and returns picklable
:class:`DreamResult` objects, so a Ray worker can compute and the driver writes
(:func:`write_dream`, the only function here that touches the store).
"""

from __future__ import annotations

import json
import math
from typing import Callable

from pipeline.config import ReverieConfig
from pipeline.errors import ReverieError
from pipeline.store import Store, now
from sae_targets.loading import Subject, check_latents
from sae_targets.objectives import build_objective
from sae_targets.selection import Target
from stages.dream.attribution import token_attribution
from stages.dream.epo import IterationStats, run_epo
from stages.dream.evaluator import PromptEvaluator
from stages.dream.pareto import frontier_of
from stages.dream.result import DreamResult


def dream_target(cfg: ReverieConfig, subject: Subject, target: Target, seed: int,
                 progress: Callable[[IterationStats], None] | None = None) -> DreamResult:
    """Dream one target with one seed: EPO (``cfg.dream``) on the target's objective
    (``cfg.targets``: quantity, reduce, p, offset), then token attribution of the
    ``cfg.dream.attribution_prompts`` highest-activation frontier prompts. No DB access.

    Returns:
        :class:`DreamResult` (CPU only; picklable).
    Raises:
        TargetError: a latent id outside the SAE.
        ConfigError: see :func:`stages.dream.epo.run_epo`.
    """
    check_latents(list(target.latents), subject.d_sae)
    objective = build_objective(subject.sae, target, cfg.targets)
    result = run_epo(subject, objective, cfg.dream, seed, progress)
    result.target_id = target.target_id
    if cfg.dream.attribution_prompts > 0 and result.frontier:
        ev = PromptEvaluator(subject, objective, cfg.dream)
        for p in result.frontier[: cfg.dream.attribution_prompts]:
            result.attributions[tuple(p.token_ids)] = token_attribution(ev, p.token_ids, cfg.dream.attribution_topk)
    return result


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
    }
    prompts, attrs = [], []
    for idx, p in enumerate(result.frontier):
        prompts.append({
            "dream_id": dream_id, "idx": idx, "token_ids": [int(i) for i in p.token_ids], "tokens": list(p.tokens), "text": p.text,
            "activation": float(p.activation), "ce": float(p.ce), "perplexity": float(math.exp(min(p.ce, 700.0))),
            "lam": None if p.lam is None else float(p.lam), "iteration": int(p.iteration),
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


def run_dream_stage(cfg: ReverieConfig, subject: Subject, store: Store, run_id: str, targets: list[Target]) -> list[DreamResult]:
    """Dream every target × ``cfg.dream.seeds`` in this process with a tqdm progress bar
    (iteration, best activation, frontier size, candidates/s), writing each (target, seed) as
    soon as it finishes.

    Returns:
        One :class:`DreamResult` per (target, seed), targets in order, seeds in config order
        (merge a target's seeds with :func:`merge_results`).
    """
    from tqdm.auto import tqdm

    out: list[DreamResult] = []
    for target in targets:
        for seed in cfg.dream.seeds:
            with tqdm(total=cfg.dream.iterations, desc=f"dream {target.target_id} seed {seed}", unit="it", leave=True) as bar:
                def progress(s: IterationStats, bar=bar) -> None:
                    bar.update(s.iteration - bar.n)
                    bar.set_postfix(best=f"{s.best_activation:.3g}", frontier=s.frontier_size, cand_s=f"{s.candidates_per_s:.0f}", refresh=False)

                result = dream_target(cfg, subject, target, seed, progress)
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
