"""Pareto frontier (stages.pareto, one definition for dream, scan and compare): exactly the
non-dominated set with the documented tie rule (brute force), and merging seeds' frontiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reverie.stages.compare import pareto_frontier as compare_frontier
from reverie.stages.dream.pareto import dedup_rows_first, frontier_mask, frontier_of
from reverie.stages.pareto import pareto_frontier, pareto_mask, pareto_order


def brute_force(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The module's rule, literally: non-finite points out; i is out when some j dominates it, or
    when an earlier j equals it on both coordinates."""
    n = len(a)
    fin = np.isfinite(a) & np.isfinite(c)
    out = fin.copy()
    for i in range(n):
        for j in range(n):
            if not (fin[i] and fin[j]) or i == j:
                continue
            dominated = a[j] >= a[i] and c[j] <= c[i] and (a[j] > a[i] or c[j] < c[i])
            earlier_twin = j < i and a[j] == a[i] and c[j] == c[i]
            if dominated or earlier_twin:
                out[i] = False
                break
    return out


def _points(rng: np.random.Generator, trial: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(0, 80))
    if trial % 3 == 1:   # many exact ties in one or both coordinates
        a, c = rng.integers(0, 6, n).astype(float), rng.integers(0, 6, n).astype(float)
    else:
        a, c = rng.normal(size=n), rng.normal(size=n)
    if trial % 3 == 2 and n:   # non-finite values
        a[rng.integers(0, n, 3)] = np.nan
        c[rng.integers(0, n, 2)] = np.inf
    return a, c


def test_pareto_mask_equals_brute_force_with_ties_and_non_finite():
    rng = np.random.default_rng(0)
    for trial in range(90):
        a, c = _points(rng, trial)
        want = brute_force(a, c)
        np.testing.assert_array_equal(pareto_mask(a, c), want)
        # the other entry points are the same set: ordered indices, (act, ce) pairs, tensors
        order = pareto_order(a, c)
        assert sorted(order.tolist()) == np.flatnonzero(want).tolist()
        assert np.all(np.diff(c[order]) >= 0) and np.all(np.diff(a[order]) > 0)   # CE ascending, activation strictly rising
        pts = list(zip(a.tolist(), c.tolist()))
        assert pareto_frontier(pts) == order.tolist() == compare_frontier(pts)
        np.testing.assert_array_equal(frontier_mask(torch.tensor(a, dtype=torch.float32), torch.tensor(c, dtype=torch.float32)).numpy(),
                                      brute_force(a.astype(np.float32), c.astype(np.float32)))


def test_tie_rule_keeps_the_first_of_equal_points():
    # 0 and 2 are equal on both coordinates: only 0 is kept; 3 has 1's activation at higher CE: dominated
    a = [2.0, 3.0, 2.0, 3.0, 1.0]
    c = [1.0, 2.0, 1.0, 2.5, 0.5]
    assert pareto_mask(a, c).tolist() == [True, True, False, False, True]
    assert pareto_frontier(list(zip(a, c))) == [4, 0, 1]
    assert pareto_mask([5.0, 5.0, 5.0], [1.0, 1.0, 1.0]).tolist() == [True, False, False]


def test_pareto_mask_nan_empty_and_shape_errors():
    assert pareto_mask([], []).shape == (0,) and pareto_frontier([]) == []
    assert pareto_mask([1.0, float("nan"), 0.5], [1.0, 0.0, 2.0]).tolist() == [True, False, False]
    assert pareto_mask([1.0, 9.0], [1.0, float("inf")]).tolist() == [True, False]   # an infinite CE never counts
    with pytest.raises(ValueError, match="2 activations but 3"):
        pareto_mask([1.0, 2.0], [1.0, 2.0, 3.0])


def test_frontier_mask_stays_on_the_tensors_device():
    m = frontier_mask(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 0.5, 0.5]))
    assert m.dtype == torch.bool and m.device.type == "cpu" and m.tolist() == [False, True, False]


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
