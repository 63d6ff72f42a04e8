"""Pareto frontier: exactly the non-dominated set (brute force), merging seeds' frontiers."""

from __future__ import annotations

import numpy as np
import torch

from reverie.stages.dream.pareto import dedup_rows_first, frontier_of, pareto_mask


def brute_force(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    n = len(a)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if a[j] >= a[i] and c[j] <= c[i] and (a[j] > a[i] or c[j] < c[i]):
                out[i] = False
                break
    return out


def test_pareto_mask_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 80))
        if trial % 2:   # many exact ties in both coordinates
            a, c = rng.integers(0, 6, n).astype(float), rng.integers(0, 6, n).astype(float)
        else:
            a, c = rng.normal(size=n), rng.normal(size=n)
        got = pareto_mask(torch.tensor(a), torch.tensor(c)).numpy()
        np.testing.assert_array_equal(got, brute_force(a, c))


def test_pareto_mask_nan_and_empty():
    assert pareto_mask([], []).numel() == 0
    m = pareto_mask([1.0, float("nan"), 0.5], [1.0, 0.0, 2.0]).tolist()
    assert m == [True, False, False]


def test_dedup_rows_first_keeps_first_occurrence():
    t = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    assert dedup_rows_first(t).tolist() == [0, 1, 3]


def test_frontier_of_merges_and_dedups():
    items = ["a", "b", "a-again", "c", "d"]
    act = [1.0, 2.0, 1.5, 0.5, 2.0]
    ce = [1.0, 3.0, 0.1, 0.5, 4.0]
    keys = [(1,), (2,), (1,), (3,), (4,)]
    # 'a-again' is a duplicate of 'a' by token ids and is dropped; 'd' is dominated by 'b'
    assert frontier_of(items, act, ce, keys) == ["b", "a", "c"]
