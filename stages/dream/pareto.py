"""Pareto frontiers of activation (maximize) vs cross-entropy (minimize), Thompson et al. 2024 §2.

A point a dominates b when ``act_a ≥ act_b``, ``ce_a ≤ ce_b`` and at least one inequality is
strict. The frontier is the exact set of non-dominated points; points with identical
(activation, CE) but different prompts are all kept (neither dominates the other).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def pareto_mask(activation: torch.Tensor | np.ndarray | Sequence[float], ce: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    """Exact non-dominated mask, maximizing activation and minimizing CE, in O(N log N).

    Args:
        activation: [N] float objective values (any device when a tensor).
        ce: [N] float cross-entropies (nats/token), same device.
    Returns:
        bool [N] on the inputs' device (CPU for lists/arrays): True where no other point
        dominates. NaN points are never on the frontier and never dominate.
    """
    a = torch.as_tensor(activation, dtype=torch.float64) if not isinstance(activation, torch.Tensor) else activation.double()
    c = torch.as_tensor(ce, dtype=torch.float64, device=a.device) if not isinstance(ce, torch.Tensor) else ce.double().to(a.device)
    n = a.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=a.device)
    valid = ~(torch.isnan(a) | torch.isnan(c))
    a_ = torch.where(valid, a, torch.full_like(a, -torch.inf))
    c_ = torch.where(valid, c, torch.full_like(c, torch.inf))
    # sort by activation descending, then CE ascending
    order1 = torch.argsort(c_, stable=True)
    order = order1[torch.argsort(-a_[order1], stable=True)]
    sa, sc = a_[order], c_[order]
    # groups of equal activation (consecutive after sorting)
    new_group = torch.ones(n, dtype=torch.bool, device=a.device)
    new_group[1:] = sa[1:] != sa[:-1]
    gid = torch.cumsum(new_group.long(), 0) - 1
    gmin = sc[new_group]                       # first = smallest CE of each group
    # min CE over groups with strictly larger activation
    prev = torch.cat([torch.full((1,), torch.inf, dtype=sc.dtype, device=a.device), gmin[:-1]])
    excl = torch.cummin(prev, 0).values
    dominated = (excl[gid] <= sc) | (gmin[gid] < sc)
    out = torch.empty(n, dtype=torch.bool, device=a.device)
    out[order] = ~dominated
    return out & valid


def dedup_first(keys: Sequence[tuple[int, ...]]) -> list[int]:
    """Indices of the first occurrence of each key, in input order."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def dedup_rows_first(tokens: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the first occurrence of each distinct row, on the tensor's device.

    Args:
        tokens: [N, n] int64 token ids.
    Returns:
        int64 [U] indices into the rows.
    """
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), tokens.shape[0], dtype=torch.long, device=tokens.device)
    first.scatter_reduce_(0, inverse, torch.arange(tokens.shape[0], device=tokens.device), reduce="amin")
    return torch.sort(first).values


def frontier_of(items: Sequence[T], activation: Sequence[float], ce: Sequence[float], keys: Sequence[tuple[int, ...]]) -> list[T]:
    """Merge candidates (e.g. several seeds' frontiers): dedup by ``keys`` (token ids, first kept),
    then keep the non-dominated ones, activation descending."""
    idx = dedup_first(keys)
    if not idx:
        return []
    m = pareto_mask([activation[i] for i in idx], [ce[i] for i in idx]).tolist()
    kept = [i for i, k in zip(idx, m) if k]
    kept.sort(key=lambda i: (-activation[i], ce[i]))
    return [items[i] for i in kept]
