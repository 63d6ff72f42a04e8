"""Random-prompt baselines of objectives (Thompson et al. 2024 §3.5, method 1; eq. 5).

One source for every stage that needs them: the scan stores them per objective (z-scores of
dreams and dataset windows), and the dream stage reads σ_random as the objective's scale
(``dream.objective_scale = "z"``) so λ means the same for every objective.
"""

from __future__ import annotations

from typing import Sequence

import torch

from reverie.sae_targets.contexts import hook_activations
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective
from reverie.sae_targets.spec import Baseline  # noqa: F401 - defined torch-free, re-exported


BASELINE_SEED = 0   # seed of the random prompts every baseline uses (scan and objective scales)


def _prefixed(subject: Subject, windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, n(+1)] int64: windows of equal length with BOS prepended per ``subject.prepend_bos``."""
    return torch.tensor([subject.with_bos(list(w)) for w in windows], dtype=torch.long)


def random_prompts(subject: Subject, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Prompts of uniformly random allowed tokens, paper §3.5 method 1: the same ids dreams may
    hold (:meth:`Subject.unusable_ids` excluded: special tokens, never-trained padding ids).

    Returns:
        int64 [n, length] token ids (no BOS), deterministic for ``seed``.
    """
    banned = subject.unusable_ids()
    allowed = torch.tensor([i for i in range(subject.vocab_size) if i not in banned], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n, length), generator=g)]


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
    first = subject.n_bos
    out = []
    for o in objectives:
        with torch.no_grad():
            v = torch.cat([o(x, slice(first, None)).double().cpu() for x in chunks])
        out.append(Baseline(objective_key=o.key, n=len(v), length=int(prompts.shape[1]), mean=float(v.mean()),
                            std=float(v.std()) if len(v) > 1 else 0.0, max=float(v.max())))
    return out
