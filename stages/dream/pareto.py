"""Merging dream frontiers: dedup by token ids, then the Pareto set of :mod:`stages.pareto`.

The frontier itself (activation maximized, CE minimized; of points equal on both, the first
kept; non-finite points never on it) is :func:`stages.pareto.pareto_mask`, shared with the scan
and compare; :func:`frontier_mask` applies it to tensors on any device.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch

from reverie.stages.pareto import pareto_mask

T = TypeVar("T")


def frontier_mask(activation: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """:func:`stages.pareto.pareto_mask` of two tensors (copied to the CPU; N is a frontier plus
    one round of candidates, so the copy is small).

    Args:
        activation: [N] float objective values, any device.
        ce: [N] float cross-entropies (nats/token), same device.
    Returns:
        bool [N] on ``activation``'s device.
    """
    m = pareto_mask(activation.detach().double().cpu().numpy(), ce.detach().double().cpu().numpy())
    return torch.from_numpy(m).to(activation.device)


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
