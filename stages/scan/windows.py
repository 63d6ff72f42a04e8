"""Short prompts fed alone after BOS: window cross-entropy, objective values, random-prompt baselines.

These are the quantities of the paper's Fig. 3 (activation vs. cross-entropy of dreams and
of dataset windows of the same length) and §3.5 (z-scores against 1,024 random prompts,
eq. 5). Cross-entropy is the dream stage's: the mean over the window's tokens of
−log p(t_i | BOS, t_<i), in nats/token, from the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sae_targets.contexts import hook_activations
from sae_targets.loading import Subject
from sae_targets.objectives import Objective


def _prefixed(subject: Subject, windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, n(+1)] int64: windows of equal length with BOS prepended per ``subject.prepend_bos``."""
    return torch.tensor([subject.with_bos(list(w)) for w in windows], dtype=torch.long)


def _offset(subject: Subject) -> int:
    return 1 if subject.prepend_bos and subject.bos_id is not None else 0


@dataclass
class WindowEval:
    """Per-window results, in input order.

    Attributes:
        ce: [N] float, cross-entropy of the window after BOS (nats/token).
        values: objective key → [N] float, the objective on the window fed alone.
    """

    ce: np.ndarray
    values: dict[str, np.ndarray]


def evaluate_windows(subject: Subject, windows: Sequence[Sequence[int]], objectives: Sequence[Objective]) -> WindowEval:
    """CE and objective values of token windows fed alone after BOS (paper Fig. 3 dataset points).

    Uses the dream stage's :class:`~stages.dream.evaluator.PromptEvaluator` (full model, no
    prefix/suffix), so a window's CE and f(t) are defined exactly as a dream's. Windows may
    differ in length; equal lengths are evaluated together (no padding).

    Args:
        windows: N lists of corpus token ids (no BOS).
        objectives: objectives evaluated on every window (CE does not depend on them; with none,
            only CE is computed).
    Returns:
        :class:`WindowEval`.
    """
    from pipeline.config import EPOConfig
    from stages.dream.evaluator import PromptEvaluator

    n = len(windows)
    ce = np.full(n, np.nan)
    values = {o.key: np.full(n, np.nan) for o in objectives}
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        if len(w):
            by_len.setdefault(len(w), []).append(i)
    dummy = objectives[:1] or [Objective(sae=subject.sae, latents=[0])]
    for length, idx in sorted(by_len.items()):
        toks = torch.tensor([list(windows[i]) for i in idx], dtype=torch.long)
        ecfg = EPOConfig(n_tokens=length, prefix_cache=False)
        for k, o in enumerate(objectives or dummy):
            out = PromptEvaluator(subject, o, ecfg).evaluate(toks)
            if k == 0:
                ce[idx] = out.ce.double().cpu().numpy()
            if objectives:
                values[o.key][idx] = out.act.double().cpu().numpy()
    return WindowEval(ce=ce, values=values)


def random_prompts(subject: Subject, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Prompts of uniformly random allowed tokens (special tokens excluded), paper §3.5 method 1.

    Returns:
        int64 [n, length] token ids (no BOS), deterministic for ``seed``.
    """
    banned = subject.special_ids()
    allowed = torch.tensor([i for i in range(subject.vocab_size) if i not in banned], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n, length), generator=g)]


@dataclass
class Baseline:
    """Random-prompt statistics of one objective (paper §3.5, eq. 5: z = (a − μ) / σ)."""

    objective_key: str
    n: int
    length: int
    mean: float
    std: float
    max: float


def hook_acts_of_prompts(subject: Subject, prompts: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Hook activations of prompts (BOS prepended per the SAE), run only up to the hook's block.

    Returns:
        list of [b, T, d_in] chunks covering ``prompts`` in order.
    """
    toks = _prefixed(subject, prompts.tolist())
    return [hook_activations(subject, toks[s : s + batch_size]) for s in range(0, len(toks), batch_size)]


def baselines(subject: Subject, prompts: torch.Tensor, objectives: Sequence[Objective], batch_size: int = 256) -> list[Baseline]:
    """Mean, standard deviation (ddof 1) and max of each objective over random prompts.

    Args:
        prompts: int64 [N, n] from :func:`random_prompts`.
    Returns:
        one :class:`Baseline` per objective, in order.
    """
    chunks = hook_acts_of_prompts(subject, prompts, batch_size)
    first = _offset(subject)
    out = []
    for o in objectives:
        with torch.no_grad():
            v = torch.cat([o(x, slice(first, None)).double().cpu() for x in chunks])
        out.append(Baseline(objective_key=o.key, n=len(v), length=int(prompts.shape[1]), mean=float(v.mean()),
                            std=float(v.std()) if len(v) > 1 else 0.0, max=float(v.max())))
    return out
