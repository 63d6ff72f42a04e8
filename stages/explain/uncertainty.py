"""95% confidence intervals of explanation scores (issue 12).

* Proportions (precision = tp / (tp + fp), recall = tp / n_pos): the Wilson score interval
  (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the normal interval at small n).
* Balanced accuracy and F1 (not proportions): a percentile bootstrap stratified by class (the
  firing and non-firing examples are resampled separately, so every resample keeps the design's
  n_pos and n_neg), ``n_boot`` resamples with a fixed seed (deterministic).

The intervals are over the held-out examples (the scorer's labels are taken as fixed); they do not
cover the scorer LLM's own sampling noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a proportion k / n (both ends in [0, 1]); (None, None) when n = 0."""
    if n <= 0:
        return None, None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ba_f1(truth: Sequence[bool], pred: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Stratified percentile-bootstrap 95% intervals of balanced accuracy and F1.

    Args:
        truth, pred: equal-length booleans with both classes present in ``truth``.
    Returns:
        ``{'balanced_accuracy': (lo, hi), 'f1': (lo, hi)}``.
    Raises:
        ValueError: a class is absent or the lengths differ.
    """
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} truths but {p.size} predictions")
    pp, pn = p[t], p[~t]
    if not len(pp) or not len(pn):
        raise ValueError("bootstrap needs both classes")
    rng = np.random.default_rng(seed)
    tp = pp[rng.integers(0, len(pp), (n_boot, len(pp)))].sum(1).astype(np.float64)
    fp = pn[rng.integers(0, len(pn), (n_boot, len(pn)))].sum(1).astype(np.float64)
    fn, tn = len(pp) - tp, len(pn) - fp
    ba = (tp / len(pp) + tn / len(pn)) / 2
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    q = lambda x: (float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5)))  # noqa: E731
    return {"balanced_accuracy": q(ba), "f1": q(f1)}


def score_intervals(truth: Sequence[bool], pred: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float | None, float | None, str]]:
    """95% intervals of every stored metric: ``{metric: (lo, hi, method)}``, method 'wilson' or 'bootstrap'."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    tp, fp = int((t & p).sum()), int((~t & p).sum())
    out: dict[str, tuple[float | None, float | None, str]] = {
        "precision": (*wilson(tp, tp + fp), "wilson"), "recall": (*wilson(tp, int(t.sum())), "wilson")}
    for m, (lo, hi) in bootstrap_ba_f1(t, p, n_boot, seed).items():
        out[m] = (lo, hi, "bootstrap")
    return out
