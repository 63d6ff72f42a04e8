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

from reverie.sae_targets.baseline import Baseline, baselines, hook_acts_of_prompts, random_prompts  # noqa: F401 - re-exported
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective


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
    from reverie.pipeline.config import EPOConfig
    from reverie.stages.dream.evaluator import PromptEvaluator

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
