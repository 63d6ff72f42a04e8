"""Evolutionary Prompt Optimization (Thompson et al. 2024, "Fluent dreaming for language models", §2).

Population of M prompts of n tokens; slot i maximizes L_λi(t) = f(t) − λ_i·CE(t) (eq. 1) with
λ_i log-spaced in [λ_min, λ_max]. Each iteration: token gradients of each member's own L_λi,
top-k per position, r children per member (one position replaced by a random top-k token),
evaluation of all children, and selection with replacement per λ. Every T_restart iterations
a λ_r ~ U[λ_r,min, λ_r,max] is drawn and only the member optimal under L_λr is kept (the
reference code draws λ_r and then ignores it; here it is used). The Pareto frontier is kept over
every candidate evaluated, deduplicated by token ids.

Several populations (targets × seeds) run as one batched search (:func:`run_epo_batch`): one
gradient pass and one chunked forward per iteration for all of them, each keeping its own λ
grid, RNG streams, restarts and frontier. EPO optimizes f/scale − λ·CE, where the objective
scale (σ of f over random prompts by default) makes λ mean the same for every objective.

Device work stays batched on the model's device; survivors (slots whose member did not change)
reuse their gradient, top-k and cached keys/values. One small host sync per iteration remains:
which slots changed (it sets the gradient batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from reverie.pipeline.config import EPOConfig
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective
from reverie.stages.dream.evaluator import EvalOut, PromptEvaluator, log_lambdas, merge_states
from reverie.stages.dream.pareto import dedup_rows_first, frontier_mask
from reverie.stages.dream.proposals import propose_children, restart_choice, select_with_replacement, topk_candidates
from reverie.stages.dream.result import DreamPrompt, DreamResult, FrontierSnapshot, RestartEvent


@dataclass
class IterationStats:
    """Progress of one EPO run after an iteration (for the progress bar)."""

    iteration: int
    total: int
    best_activation: float
    frontier_size: int
    candidates_per_s: float
    elapsed_s: float


class _Frontier:
    """Pareto frontier over every candidate seen, kept on the device, deduplicated by token ids
    (the first evaluation of a prompt is kept). Candidates are queued by :meth:`add` and merged
    by :meth:`flush` (dedup + Pareto filter need a device sync, so the engine merges every few
    iterations; the result is the same as merging every time)."""

    def __init__(self, n: int, device: torch.device):
        self.tokens = torch.zeros(0, n, dtype=torch.long, device=device)
        self.act = torch.zeros(0, device=device)
        self.ce = torch.zeros(0, device=device)
        self.iteration = torch.zeros(0, dtype=torch.long, device=device)
        self.lam = torch.zeros(0, device=device)
        self._queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, tokens: torch.Tensor, act: torch.Tensor, ce: torch.Tensor, iteration: int, lam: torch.Tensor) -> None:
        """Queue candidates [C, n] with their f, CE, iteration and λ (no device sync)."""
        it = torch.full((tokens.shape[0],), iteration, dtype=torch.long, device=tokens.device)
        self._queue.append((tokens, act.float(), ce.float(), it, lam.float()))

    def flush(self) -> bool:
        """Merge queued candidates; returns whether any of them entered the frontier."""
        if not self._queue:
            return False
        n_old = self.tokens.shape[0]
        parts = list(zip(*self._queue))
        self._queue = []
        t = torch.cat([self.tokens, *parts[0]])
        a = torch.cat([self.act, *parts[1]])
        c = torch.cat([self.ce, *parts[2]])
        it = torch.cat([self.iteration, *parts[3]])
        la = torch.cat([self.lam, *parts[4]])
        keep = dedup_rows_first(t)
        keep = keep[frontier_mask(a[keep], c[keep])]
        self.tokens, self.act, self.ce, self.iteration, self.lam = t[keep], a[keep], c[keep], it[keep], la[keep]
        return bool((keep >= n_old).any())

    def rescored(self, act: torch.Tensor, ce: torch.Tensor) -> "_Frontier":
        """(After :meth:`flush`.) The same prompts with new values (e.g. re-scored in float32), re-filtered to the Pareto set."""
        out = _Frontier(self.tokens.shape[1], self.tokens.device)
        keep = frontier_mask(act.float(), ce.float())
        out.tokens, out.act, out.ce = self.tokens[keep], act.float()[keep], ce.float()[keep]
        out.iteration, out.lam = self.iteration[keep], self.lam[keep]
        return out

    def snapshot(self, seed: int, iteration: int) -> FrontierSnapshot:
        self.flush()
        order = torch.argsort(self.ce)
        return FrontierSnapshot(seed=seed, iteration=iteration, activation=self.act[order].tolist(), ce=self.ce[order].tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DreamJob:
    """One population of a (batched) EPO search.

    Attributes:
        objective: f(t) of this population (``sae_targets.objectives.Objective``).
        seed: seeds its initialization, proposals and restarts (its own RNG streams).
        scale: positive divisor of f in L_λ = f/scale − λ·CE (objective scale; 1 = raw units).
        scale_kind: where the scale came from ('z', 'dataset_max', 'raw'), recorded in the result.
    """

    objective: Objective
    seed: int
    scale: float = 1.0
    scale_kind: str = "raw"


def run_epo(subject: Subject, objective: Objective, cfg: EPOConfig, seed: int,
            progress: Callable[[IterationStats], None] | None = None, scale: float = 1.0,
            scale_kind: str = "raw") -> DreamResult:
    """Run EPO for one objective and seed (Thompson et al. 2024 §2, Table 1 defaults in ``cfg``):
    :func:`run_epo_batch` with one job.

    Args:
        subject: the loaded model + SAE (the model gives CE; the hook on ``subject.hook_name``
            gives the activations ``objective`` reads, in the same forward pass).
        objective: f(t): hook activations [B, T, d_in] → [B] (see ``sae_targets.objectives``).
        cfg: :class:`~pipeline.config.EPOConfig`.
        seed: the same seed on CPU gives the same frontier.
        progress: called after every iteration with :class:`IterationStats`.
        scale / scale_kind: see :class:`DreamJob`.
    Returns:
        :class:`DreamResult` (CPU, picklable) without attributions.
    Raises:
        ConfigError: banned/special tokens in ``init_text``, an unknown ban-list string.
    """
    return run_epo_batch(subject, [DreamJob(objective, seed, scale, scale_kind)], cfg, progress)[0]


def run_epo_batch(subject: Subject, jobs: Sequence[DreamJob], cfg: EPOConfig,
                  progress: Callable[[IterationStats], None] | None = None,
                  should_stop: Callable[[], None] | None = None) -> list[DreamResult]:
    """Run several EPO populations as one batched search (paper §2 for each population).

    G jobs × M members share one gradient pass per iteration (only the members that changed),
    and their G × M × r children share one chunked forward pass; objectives that read different
    latents (or combinations) read the same hook activations. Each job keeps its own λ grid,
    selection with replacement, restarts (λ_r drawn from its own generator), frontier, RNG
    streams and result: on CPU a job's frontier is the same as when it runs alone.

    Per iteration and job: r children per member (one position replaced by a random top-k
    gradient token, step 2c), evaluation, selection with replacement per λ_i of
    L_λi = f/scale − λ_i·CE (step 3), every ``restart_every`` iterations a restart from the
    member optimal under a drawn λ_r. The Pareto frontier (f vs CE, unscaled) is kept over every
    candidate evaluated, deduplicated by token ids.

    Args:
        subject: the loaded model + SAE.
        jobs: the populations (objective, seed, scale).
        cfg: EPO settings (shared by all jobs).
        progress: called with :class:`IterationStats` (of the batch) whenever the frontiers merge:
            every min(history_every, 10) iterations, or every iteration with early stopping.
        should_stop: called once per iteration; may raise to interrupt (e.g. on SIGINT).
    Returns:
        One :class:`DreamResult` per job, in order; ``wall_s`` / ``timing`` are each job's share.
    Raises:
        ConfigError: banned/special tokens in ``init_text``, an unknown ban-list string.
    """
    t_start = time.perf_counter()
    G = len(jobs)
    ev = PromptEvaluator(subject, [j.objective for j in jobs], cfg, scales=[j.scale for j in jobs])
    dev = ev.device
    host_gen = [torch.Generator().manual_seed(int(j.seed)) for j in jobs]
    dev_gen = [torch.Generator(device=dev).manual_seed(int(j.seed) + 1_000_003) for j in jobs]
    M, n = cfg.population, ev.n
    lambdas = log_lambdas(cfg.lambda_min, cfg.lambda_max, M, dev).float()
    lam_all = lambdas.repeat(G)
    slot_group = np.repeat(np.arange(G), M)
    timing = {"gradient": 0.0, "proposal": 0.0, "evaluation": 0.0, "selection": 0.0}

    # ---- initial populations (paper §2 step 1)
    if ev.init_ids is not None:
        pop = torch.tensor([ev.init_ids] * (M * G), dtype=torch.long, device=dev)
    else:
        pop = torch.cat([ev.random_prompts(M, dev_gen[g]) for g in range(G)])
    t0 = time.perf_counter()
    grad, out, state = ev.gradients(pop, lam_all, slot_group)
    topk = topk_candidates(grad, ev.allowed, cfg.topk)
    del grad
    _sync(dev)
    timing["gradient"] += time.perf_counter() - t0
    act, ce = out.act, out.ce
    frontiers = [_Frontier(n, dev) for _ in range(G)]
    for g in range(G):
        sl = slice(g * M, (g + 1) * M)
        frontiers[g].add(pop[sl], act[sl], ce[sl], 0, lambdas)
        frontiers[g].flush()
    n_cand = [M] * G
    history: list[list[FrontierSnapshot]] = [[] for _ in range(G)]
    restarts: list[list[RestartEvent]] = [[] for _ in range(G)]
    stop_reason = ["iterations"] * G
    last_it = [0] * G
    since_improved = [0] * G
    active = list(range(G))
    scale = [float(j.scale) for j in jobs]
    it = 0
    for it in range(1, cfg.iterations + 1):
        if should_stop is not None:
            should_stop()
        # ---- proposals (step 2b/2c), each job from its own generators
        t0 = time.perf_counter()
        kids_of: list[tuple[int, object]] = []
        for g in active:
            sl = slice(g * M, (g + 1) * M)
            kids = propose_children(pop[sl], topk[sl], state.logprobs[sl], ev.allowed, cfg, host_gen[g], dev_gen[g])
            if cfg.retokenize_filter:
                kids = kids.subset(_retokenizes(subject, kids.tokens))
            kids_of.append((g, kids))
        tokens = torch.cat([k.tokens for _, k in kids_of])
        slots = torch.cat([k.slot + g * M for g, k in kids_of])
        first = np.concatenate([k.first for _, k in kids_of])
        kgroup = np.concatenate([np.full(k.tokens.shape[0], g) for g, k in kids_of])
        _sync(dev)
        t1 = time.perf_counter()
        # ---- evaluation of every job's children in one batch
        res: EvalOut = ev.evaluate_children(tokens, slots, first, state, kgroup)
        _sync(dev)
        t2 = time.perf_counter()
        # ---- selection with replacement (step 3) per job, and each job's frontier
        new_pop, new_act, new_ce = pop.clone(), act.clone(), ce.clone()
        src = torch.arange(G * M, device=dev)                      # slot i ← which old slot (or −1: a child)
        off = 0
        for g, kids in kids_of:
            c = kids.tokens.shape[0]
            ks = slice(off, off + c)
            off += c
            sl = slice(g * M, (g + 1) * M)
            n_cand[g] += c
            frontiers[g].add(kids.tokens, res.act[ks], res.ce[ks], it, lambdas[kids.slot])
            pool_act = torch.cat([act[sl], res.act[ks]])
            pool_ce = torch.cat([ce[sl], res.ce[ks]])
            pool_tok = torch.cat([pop[sl], kids.tokens])
            idx = select_with_replacement(pool_act / scale[g], pool_ce, lambdas)
            if cfg.restart_every > 0 and it % cfg.restart_every == 0 and it < cfg.iterations:
                lam_r = float(cfg.restart_lambda_min + (cfg.restart_lambda_max - cfg.restart_lambda_min) * torch.rand(1, generator=host_gen[g]).item())
                sel_act, sel_ce = pool_act[idx], pool_ce[idx]
                kept = restart_choice(sel_act / scale[g], sel_ce, lam_r)
                restarts[g].append(RestartEvent(iteration=it, lam_r=lam_r, kept_slot=kept,
                                                population_activation=sel_act.tolist(), population_ce=sel_ce.tolist()))
                idx = idx[torch.full((M,), kept, dtype=torch.long, device=dev)]
            new_pop[sl], new_act[sl], new_ce[sl] = pool_tok[idx], pool_act[idx], pool_ce[idx]
            src[sl] = torch.where(idx < M, idx + g * M, torch.full_like(idx, -1))
        pop, act, ce = new_pop, new_act, new_ce
        changed = (src != torch.arange(G * M, device=dev)).cpu().numpy()     # the one host sync
        t3 = time.perf_counter()
        timing["selection"] += t3 - t2
        timing["proposal"] += t1 - t0
        timing["evaluation"] += t2 - t1
        # ---- gradients of the new members of every job in one pass (survivors keep theirs)
        if changed.any():
            rows_np = np.flatnonzero(changed)
            rows = torch.as_tensor(rows_np, device=dev)
            grad, _, new_state = ev.gradients(pop[rows], lam_all[rows], slot_group[rows_np])
            topk = topk.clone()
            topk[rows] = topk_candidates(grad, ev.allowed, cfg.topk)
            del grad
            state = merge_states(state, new_state, rows)
        _sync(dev)
        timing["gradient"] += time.perf_counter() - t3
        # ---- bookkeeping per job (frontiers merge every few iterations: a device sync each)
        elapsed = time.perf_counter() - t_start
        merge = cfg.early_stop_patience is not None or it % min(cfg.history_every, 10) == 0
        for g, _ in kids_of:
            last_it[g] = it
            if merge:
                improved = frontiers[g].flush()
                if cfg.early_stop_patience is not None:
                    since_improved[g] = 0 if improved else since_improved[g] + 1
                    if since_improved[g] >= cfg.early_stop_patience:
                        stop_reason[g] = "early_stop"
            if it % cfg.history_every == 0:
                history[g].append(frontiers[g].snapshot(jobs[g].seed, it))
        active = [g for g in active if stop_reason[g] == "iterations"]
        if progress is not None and merge:
            progress(IterationStats(iteration=it, total=cfg.iterations, best_activation=float(frontiers[0].act.max()),
                                    frontier_size=sum(int(f.act.numel()) for f in frontiers),
                                    candidates_per_s=sum(n_cand) / max(elapsed, 1e-9), elapsed_s=elapsed))
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            for g in active:
                stop_reason[g] = "time_budget"
            active = []
        if not active:
            break
    for f in frontiers:
        f.flush()
    rep = ev
    if ev.search_dtype != torch.float32:     # reported numbers are float32: re-score every frontier
        rep = PromptEvaluator(subject, [j.objective for j in jobs], cfg.model_copy(update={"search_dtype": "float32"}),
                              scales=[j.scale for j in jobs])
        for g in range(G):
            o = rep.evaluate(frontiers[g].tokens, np.full(frontiers[g].tokens.shape[0], g))
            frontiers[g] = frontiers[g].rescored(o.act, o.ce)
    wall = time.perf_counter() - t_start
    results = []
    for g, job in enumerate(jobs):
        if not history[g] or history[g][-1].iteration != last_it[g]:
            history[g].append(frontiers[g].snapshot(job.seed, last_it[g]))
        obj = job.objective
        results.append(DreamResult(
            target_id="+".join(str(i) for i in obj.latents), latents=list(obj.latents), combine=obj.combine,
            objective_key=obj.key, objective=obj.describe(), seed=int(job.seed), seeds=[int(job.seed)],
            config=cfg.model_dump(mode="json"), frontier=_frontier_prompts(subject, rep, frontiers[g], job.seed, g),
            history=history[g], restarts=restarts[g], n_iterations=last_it[g], n_candidates=n_cand[g], wall_s=wall / G,
            timing={k: v / G for k, v in timing.items()}, stop_reason=stop_reason[g],
            objective_scale=job.scale_kind, scale=float(job.scale), batch_jobs=G,
        ))
    return results


def _retokenizes(subject: Subject, tokens: torch.Tensor) -> np.ndarray:
    """Host check (optional filter): decoded text re-encodes to the same ids."""
    ids = tokens.cpu().tolist()
    texts = subject.tokenizer.batch_decode(ids)
    again = subject.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([list(a) == b for a, b in zip(again, ids)], dtype=bool)


def _frontier_prompts(subject: Subject, ev: PromptEvaluator, fr: _Frontier, seed: int, group: int = 0) -> list[DreamPrompt]:
    order = torch.argsort(-fr.act)
    tokens = fr.tokens[order]
    per_token, latent = ev.details(tokens, np.full(tokens.shape[0], group))
    ce_rest = _ce_rest(ev, tokens, group)
    out = []
    for i, ids in enumerate(tokens.cpu().tolist()):
        j = int(order[i])
        out.append(DreamPrompt(
            token_ids=ids, tokens=subject.decode_tokens(ids), text=subject.tokenizer.decode(ids),
            activation=float(fr.act[j]), ce=float(fr.ce[j]), lam=float(fr.lam[j]), iteration=int(fr.iteration[j]), seed=int(seed),
            ce_rest=ce_rest[i],
            token_acts=per_token[i].cpu().tolist(), latent_acts=latent[i].cpu().tolist(),
        ))
    return out


def _ce_rest(ev: PromptEvaluator, tokens: torch.Tensor, group: int) -> list[float | None]:
    """CE over the optimized tokens after the first (nats/token), per prompt; None when n = 1."""
    if tokens.shape[0] == 0 or ev.n < 2:
        return [None] * tokens.shape[0]
    out = ev.evaluate(tokens, np.full(tokens.shape[0], group))
    terms = out.ce_terms[:, 1:]
    scored = ev.scored[1:]
    return (terms.sum(-1) / scored.sum().clamp_min(1)).tolist()
