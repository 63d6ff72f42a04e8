"""Memory-bounded streaming summaries of per-latent activations over a corpus.

Everything here keeps O(k) state per latent however many tokens stream past, is picklable
(the scan checkpoints it), and is deterministic given the order of the stream:

* :class:`StreamingTopK` — the top-k contexts per latent by activation at their max token,
  one example per context, identical windows deduplicated (exact: equals ranking every
  candidate at once, see ``tests/test_scan_topk.py``).
* :class:`AdaptiveHistogram` — per-latent histogram of positive values whose bin width
  doubles (merging bin pairs) when a larger value arrives: fixed memory, exact counts.
* :class:`BottomKSample` — a uniform random sample of fixed size per key by priority
  sampling (keep the k smallest hash priorities): mergeable and order-independent.
* :func:`priorities` — deterministic pseudo-random priorities in [0, 1) (SplitMix64), so a
  resumed scan draws exactly the samples an uninterrupted one draws.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def priorities(a: np.ndarray, b: np.ndarray | int, salt: int) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) for integer pairs ``(a, b)``.

    Args:
        a, b: integer arrays (broadcastable), e.g. context index and latent id.
        salt: separates independent streams (random samples vs. quantile samples ...).
    Returns:
        float64 array, uniform on [0, 1) for distinct inputs.
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    z = _mix64(_mix64(a ^ np.uint64(salt & 0xFFFFFFFF)) ^ _mix64(b + np.uint64(0x632BE59BD9B4E019)))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- top-k


@dataclass
class Candidate:
    """One ranked example: a context's max token for one latent.

    Attributes:
        value: the ranking quantity at the max token.
        context_idx: index of the context in the scan's stream (ties: earlier wins).
        pos: position of the max token in the context (ties: earlier wins).
        dedup: hashable identity of the shown window (identical windows keep only the best).
        payload: anything (tokens, per-token activations) built only for accepted candidates.
    """

    value: float
    context_idx: int
    pos: int
    dedup: Hashable
    payload: Any = None

    @property
    def key(self) -> tuple[float, int, int]:
        """Total order, larger is better: value, then earlier context, then earlier position."""
        return (self.value, -self.context_idx, -self.pos)


class StreamingTopK:
    """Top-k candidates per latent under a streaming merge (memory O(n_latents · k)).

    Rules: each context offers at most one candidate per latent (its max token, so no two
    examples come from the same window); among candidates whose ``dedup`` keys are equal only
    the best is kept. The kept set always equals the top-k of the best-per-``dedup`` candidates
    seen so far (ties broken by :attr:`Candidate.key`).

    Args:
        n_latents: number of latent slots.
        k: examples kept per latent.
    """

    def __init__(self, n_latents: int, k: int):
        self.k = int(k)
        self.items: list[list[tuple[tuple[float, int, int], Candidate]]] = [[] for _ in range(n_latents)]  # ascending by key
        self.by_dedup: list[dict[Hashable, Candidate]] = [{} for _ in range(n_latents)]

    def thresholds(self) -> np.ndarray:
        """float64 [n_latents]: the value a candidate must reach (≥) to possibly enter (-inf while not full)."""
        return np.array([it[0][0][0] if len(it) >= self.k else -math.inf for it in self.items], dtype=np.float64)

    def offer(self, j: int, cand: Candidate, build: Callable[[Candidate], Any] | None = None) -> bool:
        """Offer a candidate to latent slot ``j``.

        Args:
            build: called on the candidate only when accepted, to fill ``payload`` lazily.
        Returns:
            True if it was kept.
        """
        items, seen = self.items[j], self.by_dedup[j]
        key = cand.key
        old = seen.get(cand.dedup)
        if old is not None:
            if key <= old.key:
                return False
            items.pop(bisect.bisect_left(items, (old.key,), key=lambda t: (t[0],)))
            del seen[cand.dedup]
        elif len(items) >= self.k:
            if key <= items[0][0]:
                return False
            evicted = items.pop(0)[1]
            del seen[evicted.dedup]
        if build is not None and cand.payload is None:
            cand.payload = build(cand)
        bisect.insort(items, (key, cand), key=lambda t: t[0])
        seen[cand.dedup] = cand
        return True

    def result(self, j: int) -> list[Candidate]:
        """Kept candidates of slot ``j``, best first."""
        return [c for _, c in reversed(self.items[j])]

    def __len__(self) -> int:
        return sum(len(it) for it in self.items)


# ----------------------------------------------------------------------------- histogram


class AdaptiveHistogram:
    """Per-latent histograms of positive values with a power-of-two bin width that grows.

    Bins are ``[i·w, (i+1)·w)`` for ``i < n_bins``; when a value ≥ ``n_bins·w`` arrives, bin
    pairs merge and ``w`` doubles, so counts stay exact and memory fixed ([n_latents, n_bins]).

    Args:
        n_latents: number of latent slots.
        n_bins: bins per latent (rounded up to even, so pairs merge).
    """

    def __init__(self, n_latents: int, n_bins: int):
        self.n_bins = int(n_bins) + (int(n_bins) % 2)
        self.width = np.zeros(n_latents, dtype=np.float64)  # 0 = nothing seen yet
        self.counts = np.zeros((n_latents, self.n_bins), dtype=np.int64)

    def _grow(self, j: int, vmax: float) -> None:
        if self.width[j] == 0.0:
            self.width[j] = 2.0 ** (math.floor(math.log2(vmax / self.n_bins)) + 1)
        while vmax >= self.n_bins * self.width[j]:
            merged = self.counts[j].reshape(-1, 2).sum(axis=1)
            self.counts[j] = 0
            self.counts[j, : len(merged)] = merged
            self.width[j] *= 2.0

    def add(self, latent_idx: np.ndarray, values: np.ndarray) -> None:
        """Count values (> 0, finite) of the given latent slots. Shapes: [N] int, [N] float."""
        if len(values) == 0:
            return
        values = np.asarray(values, dtype=np.float64)
        latent_idx = np.asarray(latent_idx, dtype=np.int64)
        vmax = np.zeros(len(self.width))
        np.maximum.at(vmax, latent_idx, values)
        for j in np.flatnonzero(vmax > 0):
            self._grow(int(j), float(vmax[j]))
        b = np.minimum((values / self.width[latent_idx]).astype(np.int64), self.n_bins - 1)
        self.counts += np.bincount(latent_idx * self.n_bins + b, minlength=self.counts.size).reshape(self.counts.shape)

    def edges(self, j: int) -> list[float]:
        """n_bins + 1 bin edges of slot ``j`` (empty list if it never saw a value)."""
        w = float(self.width[j])
        return [i * w for i in range(self.n_bins + 1)] if w > 0 else []

    def bin_of(self, j: int, value: float) -> int:
        """Bin index a value of slot ``j`` falls in (after growing the width to hold it)."""
        if value > 0:
            self._grow(j, value)
        w = self.width[j]
        return 0 if w == 0 or value <= 0 else min(int(value / w), self.n_bins - 1)


# ----------------------------------------------------------------------------- sampling


@dataclass
class BottomKSample:
    """Uniform sample of ``k`` items per key: keeps the ``k`` smallest priorities seen.

    Priorities come from :func:`priorities`, so the sample does not depend on batching or on
    where a scan was interrupted. The union of two samples' items, cut to the k smallest, is
    the sample of the union (used when histogram bins merge).
    """

    k: int
    groups: dict[Hashable, list[tuple[float, int, Any]]] = field(default_factory=dict)  # ascending priority

    def threshold(self, key: Hashable) -> float:
        """Priority an item must be below to enter group ``key`` (inf while not full)."""
        g = self.groups.get(key)
        return g[-1][0] if g is not None and len(g) >= self.k else math.inf

    def offer(self, key: Hashable, priority: float, tiebreak: int, build: Callable[[], Any]) -> bool:
        """Offer an item; ``build()`` makes its payload only if kept. Returns True if kept."""
        if self.k <= 0 or priority >= self.threshold(key):
            return False
        g = self.groups.setdefault(key, [])
        bisect.insort(g, (priority, tiebreak, build()), key=lambda t: (t[0], t[1]))
        if len(g) > self.k:
            g.pop()
        return True

    def merge_into(self, src: Hashable, dst: Hashable) -> None:
        """Move group ``src`` into ``dst`` keeping the k smallest priorities."""
        items = self.groups.pop(src, [])
        if not items:
            return
        g = sorted(self.groups.get(dst, []) + items, key=lambda t: (t[0], t[1]))
        self.groups[dst] = g[: self.k]

    def items(self, key: Hashable) -> list[Any]:
        """Payloads of group ``key`` in priority order."""
        return [p for _, _, p in self.groups.get(key, [])]


class QuantileSampler:
    """Uniform samples of contexts per activation range, for decile samples (explanation scoring).

    Each latent keeps an :class:`AdaptiveHistogram` of context scores with ``n_fine`` fine bins
    and a :class:`BottomKSample` of ``k`` contexts per fine bin. At the end a decile
    ``[d/10·max, (d+1)/10·max)`` is the union of the fine bins whose centre falls in it, and
    its sample is the k smallest priorities of that union (uniform within those bins).

    Args:
        n_latents: latent slots. k: samples per decile. n_fine: fine bins (≥ 2·n_deciles).
    """

    def __init__(self, n_latents: int, k: int, n_fine: int = 80):
        self.hist = AdaptiveHistogram(n_latents, n_fine)
        self.sample = BottomKSample(k)

    def offer(self, j: int, value: float, priority: float, tiebreak: int, build: Callable[[], Any]) -> bool:
        """Count a firing context of slot ``j`` with score ``value`` and maybe keep it."""
        w0 = float(self.hist.width[j])
        b = self.hist.bin_of(j, value)
        w1 = float(self.hist.width[j])
        if w0 > 0 and w1 > w0:
            f = int(round(w1 / w0))
            for i in range(1, self.hist.n_bins):
                if (j, i) in self.sample.groups and i // f != i:
                    self.sample.merge_into((j, i), (j, i // f))
        if value > 0 or self.hist.width[j] > 0:
            self.hist.counts[j, b] += 1
        if value <= 0 and self.hist.width[j] == 0:
            return False  # nothing positive seen yet: no range to place it in
        return self.sample.offer((j, b), priority, tiebreak, build)

    def deciles(self, j: int, vmax: float, n: int = 10) -> list[list[Any]]:
        """``n`` lists of kept payloads, lowest range first (empty where nothing fell)."""
        w = float(self.hist.width[j])
        if w == 0 or vmax <= 0:
            return [[] for _ in range(n)]
        pools: list[list[tuple[float, int, Any]]] = [[] for _ in range(n)]
        for i in range(self.hist.n_bins):
            g = self.sample.groups.get((j, i))
            if g:
                d = min(int((i + 0.5) * w / vmax * n), n - 1)
                pools[d].extend(g)
        return [[p for _, _, p in sorted(pool, key=lambda t: (t[0], t[1]))[: self.sample.k]] for pool in pools]
