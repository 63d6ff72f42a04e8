"""Matched-length dataset windows, searched over every position of the top contexts (issue 17 §2).

Thompson et al. 2024 (§3, Fig. 3) compare dreams with dataset examples on the activation–CE
plane, the dataset points being *windows of the dream's length fed alone after BOS*. A window
of a different length has a different CE scale and a different objective, so every window
here has exactly ``n`` tokens (contexts too short to supply one are skipped and counted), and a
context is searched at every position: the window ending at the context's max token (ranked in
context) is not, in general, the best window fed alone, nor the most fluent strong one.

CE conventions (nats/token, both for windows and dreams):

* ``ce`` — mean over all n tokens of −log p(t_i | BOS, t_<i) (the dream stage's convention);
* ``ce_rest`` — the same mean over tokens 2..n only (the first token unscored; the convention of
  the paper's reference code ``dreamy``). A window cut from the middle of a text pays a large
  price for its first token given BOS only; ``ce_rest`` does not charge it.

Corpus CE bands (:func:`ce_bands`) come from the corpus itself: the 10th and 50th percentiles
and mean + 2σ of random matched-length corpus windows. The paper's absolute numbers
(:data:`PILE_CE_MEAN`, :data:`PILE_CE_STD`, :data:`PILE_CE_LIMIT`) hold for Pythia-12B on the
Pile only and are kept as documented constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective

#: paper §3: mean and σ of the CE of 12-token Pile slices under Pythia-12B (nats/token)
PILE_CE_MEAN = 3.7
PILE_CE_STD = 1.1
#: paper §3.3 (Fig. 3 discussion): "at a cross-entropy of 4" — a Pile-scale constant, not a default
PILE_CE_LIMIT = 4.0
#: the corpus CE bands, in the order pages show them
BANDS = ("p10", "p50", "in_dist")
BAND_LABELS = {"p10": "corpus 10th percentile", "p50": "corpus median", "in_dist": "corpus mean + 2σ"}


@dataclass
class WindowSet:
    """Matched-length windows evaluated alone after BOS, in input order.

    Attributes:
        windows: int64 [N, n] token ids (no BOS).
        source: int64 [N] index of the context (in the list searched) that supplied each window.
        end_pos: int64 [N] position of the window's last token in its context (BOS = 0).
        ce: float64 [N] CE over all n tokens after BOS (nats/token).
        ce_rest: float64 [N] CE over tokens 2..n (nats/token; NaN when n = 1).
        values: objective key → float64 [N], the objective at the last token.
    """

    windows: np.ndarray
    source: np.ndarray
    end_pos: np.ndarray
    ce: np.ndarray
    ce_rest: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.windows.shape[0])


def evaluate_matched(subject: Subject, windows: np.ndarray | Sequence[Sequence[int]], objectives: Sequence[Objective]
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """CE both ways and objective values of equal-length windows fed alone after BOS.

    Uses the dream stage's :class:`~stages.dream.evaluator.PromptEvaluator` (full model, no
    prefix/suffix, plain path), so a window's numbers are defined exactly as a dream's.

    Args:
        windows: int [N, n] token ids (no BOS), all of length n ≥ 1.
        objectives: evaluated on every window (with none, only CE is computed).
    Returns:
        ``(ce, ce_rest, values)``: float64 [N], float64 [N] (NaN when n = 1), key → float64 [N].
    Raises:
        ValueError: ragged windows.
    """
    from reverie.pipeline.config import EPOConfig
    from reverie.stages.dream.evaluator import PromptEvaluator

    arr = np.asarray(windows, dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError(f"windows must be [N, n] of equal length, got shape {arr.shape}")
    N, n = arr.shape
    values = {o.key: np.full(N, np.nan) for o in objectives}
    if N == 0 or n == 0:
        return np.full(N, np.nan), np.full(N, np.nan), values
    toks = torch.from_numpy(arr)
    ecfg = EPOConfig(n_tokens=n, prefix_cache=False)
    ce = ce_rest = None
    for o in objectives or [Objective(sae=subject.sae, latents=[0])]:
        with torch.no_grad():
            out = PromptEvaluator(subject, o, ecfg).evaluate(toks)
        if ce is None:
            terms = out.ce_terms.double().cpu().numpy()
            ce = terms.mean(axis=1)
            ce_rest = terms[:, 1:].mean(axis=1) if n > 1 else np.full(N, np.nan)
        if objectives:
            values[o.key] = out.act.double().cpu().numpy()
    return ce, ce_rest, values


def context_windows(ids: Sequence[int], n: int, body0: int) -> tuple[np.ndarray, np.ndarray]:
    """Every full-length window of one context.

    Args:
        ids: the context's token ids (BOS first when ``body0`` = 1).
        n: window length (the dream's).
        body0: index of the first corpus token (1 after BOS, else 0).
    Returns:
        ``(windows, end_pos)``: int64 [m, n] and int64 [m], m = max(0, len(ids) − body0 − n + 1);
        window k ends at position ``end_pos[k]`` of the context.
    """
    body = np.asarray(list(ids)[body0:], dtype=np.int64)
    m = len(body) - n + 1
    if m <= 0:
        return np.zeros((0, n), dtype=np.int64), np.zeros(0, dtype=np.int64)
    idx = np.arange(m)[:, None] + np.arange(n)[None, :]
    return body[idx], body0 + np.arange(m, dtype=np.int64) + n - 1


def search_contexts(subject: Subject, contexts: Sequence[Sequence[int]], objectives: Sequence[Objective], n: int,
                    body0: int) -> tuple[WindowSet, int]:
    """Evaluate every full-length window ending at every position of each context (issue 17 §2).

    Identical windows (the same ids) are evaluated once and kept at their first occurrence.

    Args:
        contexts: token ids per context (BOS first when ``body0`` = 1), e.g. a latent's top contexts.
        objectives: evaluated on every window (the first is the search's objective).
        n: window length; body0: see :func:`context_windows`.
    Returns:
        ``(windows, n_short)``: the :class:`WindowSet`, and how many contexts were too short to
        supply one window of length n (skipped).
    """
    wins, src, end, n_short, seen = [], [], [], 0, set()
    for c, ids in enumerate(contexts):
        w, e = context_windows(ids, n, body0)
        if not len(w):
            n_short += 1
            continue
        keep = []
        for k in range(len(w)):
            key = w[k].tobytes()
            if key not in seen:
                seen.add(key)
                keep.append(k)
        wins.append(w[keep])
        end.append(e[keep])
        src.append(np.full(len(keep), c, dtype=np.int64))
    if not wins:
        empty = np.zeros(0)
        return WindowSet(np.zeros((0, n), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                         empty, empty.copy(), {o.key: empty.copy() for o in objectives}), n_short
    W = np.concatenate(wins)
    ce, ce_rest, values = evaluate_matched(subject, W, objectives)
    return WindowSet(W, np.concatenate(src), np.concatenate(end), ce, ce_rest, values), n_short


def best_under(act: np.ndarray, ce: np.ndarray, limit: float | None) -> int | None:
    """Index of the highest activation among points with CE ≤ ``limit`` (None: no limit); None if none.

    Ties: the lower CE, then the earlier index.
    """
    act, ce = np.asarray(act, dtype=np.float64), np.asarray(ce, dtype=np.float64)
    ok = np.isfinite(act) & np.isfinite(ce)
    if limit is not None:
        ok &= ce <= limit
    idx = np.flatnonzero(ok)
    if not len(idx):
        return None
    return int(idx[np.lexsort((idx, ce[idx], -act[idx]))[0]])


def ce_bands(ce: np.ndarray) -> dict[str, float | int | None]:
    """Corpus CE statistics of random matched-length windows (issue 17 §4).

    Args:
        ce: float [N] window CEs (nats/token); non-finite values are dropped.
    Returns:
        ``{"n", "mean", "std" (ddof 1), "p10", "p50", "in_dist" (mean + 2σ)}``; None where undefined.
    """
    ce = np.asarray(ce, dtype=np.float64)
    ce = ce[np.isfinite(ce)]
    n = int(len(ce))
    mean = float(ce.mean()) if n else None
    std = float(ce.std(ddof=1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std,
            "p10": float(np.percentile(ce, 10)) if n else None, "p50": float(np.percentile(ce, 50)) if n else None,
            "in_dist": None if mean is None or std is None else mean + 2 * std}
