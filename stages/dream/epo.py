"""Evolutionary Prompt Optimization (Thompson et al. 2024, "Fluent dreaming for language models", §2).

Population of M prompts of n tokens; slot i maximizes L_λi(t) = f(t) − λ_i·CE(t) (eq. 1) with
λ_i log-spaced in [λ_min, λ_max]. Each iteration: token gradients of each member's own L_λi,
top-k per position, r children per member (one position replaced by a random top-k token),
evaluation of all children, and selection with replacement per λ. Every T_restart iterations
a λ_r ~ U[λ_r,min, λ_r,max] is drawn and only the member optimal under L_λr is kept (the
reference code draws λ_r and then ignores it; here it is used). The Pareto frontier is kept over
every candidate evaluated, deduplicated by token ids.

Device work stays batched on the model's device; survivors (slots whose member did not change)
reuse their gradient, top-k and cached keys/values. One small host sync per iteration remains:
which slots changed (it sets the gradient batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import EPOConfig
from sae_targets.loading import Subject
from sae_targets.objectives import Objective
from stages.dream.evaluator import EvalOut, PromptEvaluator, log_lambdas, merge_states
from stages.dream.pareto import dedup_rows_first, pareto_mask
from stages.dream.proposals import propose_children, restart_choice, select_with_replacement, topk_candidates
from stages.dream.result import DreamPrompt, DreamResult, FrontierSnapshot, RestartEvent


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
    (the first evaluation of a prompt is kept)."""

    def __init__(self, n: int, device: torch.device):
        self.tokens = torch.zeros(0, n, dtype=torch.long, device=device)
        self.act = torch.zeros(0, device=device)
        self.ce = torch.zeros(0, device=device)
        self.iteration = torch.zeros(0, dtype=torch.long, device=device)
        self.lam = torch.zeros(0, device=device)

    def add(self, tokens: torch.Tensor, act: torch.Tensor, ce: torch.Tensor, iteration: int, lam: torch.Tensor) -> torch.Tensor:
        """Merge candidates; returns a 0-dim bool tensor: did any new prompt enter the frontier."""
        n_old = self.tokens.shape[0]
        t = torch.cat([self.tokens, tokens])
        a = torch.cat([self.act, act.float()])
        c = torch.cat([self.ce, ce.float()])
        it = torch.cat([self.iteration, torch.full((tokens.shape[0],), iteration, dtype=torch.long, device=t.device)])
        la = torch.cat([self.lam, lam.float()])
        keep = dedup_rows_first(t)
        keep = keep[pareto_mask(a[keep], c[keep])]
        self.tokens, self.act, self.ce, self.iteration, self.lam = t[keep], a[keep], c[keep], it[keep], la[keep]
        return (keep >= n_old).any()

    def snapshot(self, seed: int, iteration: int) -> FrontierSnapshot:
        order = torch.argsort(self.ce)
        return FrontierSnapshot(seed=seed, iteration=iteration, activation=self.act[order].tolist(), ce=self.ce[order].tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epo(subject: Subject, objective: Objective, cfg: EPOConfig, seed: int,
            progress: Callable[[IterationStats], None] | None = None) -> DreamResult:
    """Run EPO for one objective and seed (Thompson et al. 2024 §2, Table 1 defaults in ``cfg``).

    Args:
        subject: the loaded model + SAE (the model gives CE; the hook on ``subject.hook_name``
            gives the activations ``objective`` reads, in the same forward pass).
        objective: f(t): hook activations [B, T, d_in] → [B] (see ``sae_targets.objectives``).
        cfg: :class:`~pipeline.config.EPOConfig` (iterations, population, n_tokens, λ range,
            children, topk, restarts, budgets, augmentations, template, ban-list, caching).
        seed: seeds initialization, proposals and restarts; the same seed on CPU gives the
            same frontier.
        progress: called after every iteration with :class:`IterationStats`.
    Returns:
        :class:`DreamResult` (CPU, picklable) without attributions; prompts are the Pareto
        frontier (activation vs CE in nats/token) over every candidate evaluated.
    Raises:
        ConfigError: banned/special tokens in ``init_text``, an unknown ban-list string.
    """
    t_start = time.perf_counter()
    ev = PromptEvaluator(subject, objective, cfg)
    dev = ev.device
    host_gen = torch.Generator().manual_seed(int(seed))
    dev_gen = torch.Generator(device=dev).manual_seed(int(seed) + 1_000_003)
    M, n = cfg.population, ev.n
    lambdas = log_lambdas(cfg.lambda_min, cfg.lambda_max, M, dev).float()
    timing = {"gradient": 0.0, "proposal": 0.0, "evaluation": 0.0, "selection": 0.0}

    # ---- initial population (paper §2 step 1)
    if ev.init_ids is not None:
        pop = torch.tensor([ev.init_ids] * M, dtype=torch.long, device=dev)
    else:
        pop = ev.random_prompts(M, dev_gen)
    t0 = time.perf_counter()
    grad, out, state = ev.gradients(pop, lambdas)
    topk = topk_candidates(grad, ev.allowed, cfg.topk)
    del grad
    _sync(dev)
    timing["gradient"] += time.perf_counter() - t0
    act, ce = out.act, out.ce
    frontier = _Frontier(n, dev)
    frontier.add(pop, act, ce, 0, lambdas)
    n_candidates = M
    history: list[FrontierSnapshot] = []
    restarts: list[RestartEvent] = []
    stop_reason = "iterations"
    since_improved = 0
    it = 0
    for it in range(1, cfg.iterations + 1):
        # ---- proposals (step 2b/2c)
        t0 = time.perf_counter()
        kids = propose_children(pop, topk, state.logprobs, ev.allowed, cfg, host_gen, dev_gen)
        if cfg.retokenize_filter:
            kids = kids.subset(_retokenizes(subject, kids.tokens))
        _sync(dev)
        t1 = time.perf_counter()
        # ---- evaluation
        res: EvalOut = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
        _sync(dev)
        t2 = time.perf_counter()
        n_candidates += kids.tokens.shape[0]
        # ---- selection with replacement (step 3) and the frontier over every candidate
        improved = frontier.add(kids.tokens, res.act, res.ce, it, lambdas[kids.slot])
        pool_act = torch.cat([act, res.act])
        pool_ce = torch.cat([ce, res.ce])
        pool_tok = torch.cat([pop, kids.tokens])
        idx = select_with_replacement(pool_act, pool_ce, lambdas)
        pop, act, ce = pool_tok[idx], pool_act[idx], pool_ce[idx]
        restart = cfg.restart_every > 0 and it % cfg.restart_every == 0 and it < cfg.iterations
        if restart:
            lam_r = float(cfg.restart_lambda_min + (cfg.restart_lambda_max - cfg.restart_lambda_min) * torch.rand(1, generator=host_gen).item())
            kept = restart_choice(act, ce, lam_r)
            restarts.append(RestartEvent(iteration=it, lam_r=lam_r, kept_slot=kept,
                                         population_activation=act.tolist(), population_ce=ce.tolist()))
            keep_idx = torch.full((M,), kept, dtype=torch.long, device=dev)
            pop, act, ce = pop[keep_idx], act[keep_idx], ce[keep_idx]
            idx = idx[keep_idx]
        changed = (idx != torch.arange(M, device=dev)).cpu().numpy()     # the one host sync
        t3 = time.perf_counter()
        timing["selection"] += t3 - t2
        timing["proposal"] += t1 - t0
        timing["evaluation"] += t2 - t1
        # ---- gradients of the new members (survivors keep theirs)
        if changed.any():
            rows = torch.as_tensor(np.flatnonzero(changed), device=dev)
            grad, _, new_state = ev.gradients(pop[rows], lambdas[rows])
            topk = topk.clone()
            topk[rows] = topk_candidates(grad, ev.allowed, cfg.topk)
            del grad
            state = merge_states(state, new_state, rows)
        _sync(dev)
        timing["gradient"] += time.perf_counter() - t3
        # ---- bookkeeping
        if it % cfg.history_every == 0:
            history.append(frontier.snapshot(seed, it))
        elapsed = time.perf_counter() - t_start
        if progress is not None:
            progress(IterationStats(iteration=it, total=cfg.iterations, best_activation=float(frontier.act.max()),
                                    frontier_size=int(frontier.act.numel()), candidates_per_s=n_candidates / max(elapsed, 1e-9),
                                    elapsed_s=elapsed))
        if cfg.early_stop_patience is not None:
            since_improved = 0 if bool(improved) else since_improved + 1
            if since_improved >= cfg.early_stop_patience:
                stop_reason = "early_stop"
                break
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            stop_reason = "time_budget"
            break
    if not history or history[-1].iteration != it:
        history.append(frontier.snapshot(seed, it))
    prompts = _frontier_prompts(subject, ev, frontier, seed)
    return DreamResult(
        target_id="+".join(str(i) for i in objective.latents), latents=list(objective.latents), combine=objective.combine,
        objective_key=objective.key, objective=objective.describe(), seed=int(seed), seeds=[int(seed)],
        config=cfg.model_dump(mode="json"), frontier=prompts, history=history, restarts=restarts,
        n_iterations=it, n_candidates=n_candidates, wall_s=time.perf_counter() - t_start, timing=timing,
        stop_reason=stop_reason,
    )


def _retokenizes(subject: Subject, tokens: torch.Tensor) -> np.ndarray:
    """Host check (optional filter): decoded text re-encodes to the same ids."""
    ids = tokens.cpu().tolist()
    texts = subject.tokenizer.batch_decode(ids)
    again = subject.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([list(a) == b for a, b in zip(again, ids)], dtype=bool)


def _frontier_prompts(subject: Subject, ev: PromptEvaluator, fr: _Frontier, seed: int) -> list[DreamPrompt]:
    order = torch.argsort(-fr.act)
    tokens = fr.tokens[order]
    per_token, latent = ev.details(tokens)
    out = []
    for i, ids in enumerate(tokens.cpu().tolist()):
        j = int(order[i])
        out.append(DreamPrompt(
            token_ids=ids, tokens=subject.decode_tokens(ids), text=subject.tokenizer.decode(ids),
            activation=float(fr.act[j]), ce=float(fr.ce[j]), lam=float(fr.lam[j]), iteration=int(fr.iteration[j]), seed=int(seed),
            token_acts=per_token[i].cpu().tolist(), latent_acts=latent[i].cpu().tolist(),
        ))
    return out
