"""The Pareto frontier of (activation, cross-entropy) points — one definition for every stage.

Thompson et al. 2024 §2: maximize the objective (activation), minimize cross-entropy (CE, nats/token).
Point ``j`` dominates point ``i`` when ``act_j ≥ act_i`` and ``ce_j ≤ ce_i`` with at least one
inequality strict. The frontier is the set of non-dominated points, with one tie rule:

* points equal on both coordinates (exact duplicates of ``(act, ce)``): only the first (lowest
  index) is kept — the others add nothing to the frontier;
* points with a non-finite coordinate (NaN, ±inf) are never on the frontier and never dominate.

Used by the dream engine (frontier of a seed and of merged seeds; torch callers pass
``tensor.cpu().numpy()`` and index with the mask), the scan (the dataset windows' frontier) and
compare (dreams vs data). numpy only, no torch: ``stages.compare`` and the reports stay torch-free.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[float]


def pareto_order(act: ArrayLike, ce: ArrayLike) -> np.ndarray:
    """Indices of the frontier points (see the module's tie rule), in ascending CE (then descending
    activation, then index) — i.e. activation strictly increasing along the result. O(N log N).

    Args:
        act: float [N] activations (objective values; maximized).
        ce: float [N] cross-entropies (nats/token; minimized).
    Returns:
        int64 [K] indices, K ≤ N (empty for N = 0).
    Raises:
        ValueError: ``act`` and ``ce`` differ in length.
    """
    a = np.asarray(act, dtype=np.float64).reshape(-1)
    c = np.asarray(ce, dtype=np.float64).reshape(-1)
    if a.shape != c.shape:
        raise ValueError(f"pareto: {a.size} activations but {c.size} CE values")
    ok = np.flatnonzero(np.isfinite(a) & np.isfinite(c))
    if not ok.size:
        return np.zeros(0, dtype=np.int64)
    order = ok[np.lexsort((ok, -a[ok], c[ok]))]   # CE asc, activation desc, index asc
    s = a[order]
    # kept iff strictly above every activation seen at lower (or equal, earlier) CE
    before = np.concatenate(([-np.inf], np.maximum.accumulate(s)[:-1]))
    return order[s > before].astype(np.int64)


def pareto_mask(act: ArrayLike, ce: ArrayLike) -> np.ndarray:
    """Boolean frontier mask (see the module's tie rule): True where the point is on the frontier.

    Args:
        act: float [N] activations (maximized).
        ce: float [N] cross-entropies (nats/token, minimized).
    Returns:
        bool [N].
    Raises:
        ValueError: ``act`` and ``ce`` differ in length.
    """
    keep = pareto_order(act, ce)
    out = np.zeros(np.asarray(act).reshape(-1).shape[0], dtype=bool)
    out[keep] = True
    return out


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """:func:`pareto_order` of ``(activation, ce)`` pairs: indices of the frontier, ascending CE."""
    if not points:
        return []
    a, c = zip(*points)
    return [int(i) for i in pareto_order(a, c)]
