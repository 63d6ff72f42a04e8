"""The scan stage: one streamed pass over a corpus for every target latent, then the Fig. 3 / §3.5 extras.

Pass (memory bounded, checkpointed, resumable): documents → contexts of the SAE's context size
(BOS per the SAE) → model run only up to the hook's block → the target latents' SAE pre- and
post-activations (``sae_targets.activations.latent_activations``, restricted to the targets).
Per latent it keeps: the top-k contexts by the ranking quantity (``targets.quantity``, default
the pre-activation) at their max token; firing counts and a histogram of the post-activation
(density = fraction of corpus tokens with post-activation > 0; BOS positions excluded); uniform
samples per activation decile and of non-firing contexts; and, shared by all latents, a
uniform sample of dream-length corpus windows.

After the pass (Thompson et al. 2024, Fig. 3 and §3.5): every full-length window (exactly the
dream's length) ending at every position of each latent's top contexts is fed alone after BOS to
the full model (window CE both ways — all n tokens, and without the first — in nats/token, and
the target objective at its last token), and the Pareto frontier of those windows is stored
(``scan_windows``; it holds the best window of every CE band); each top example's window ending
at its max token is stored with it when full-length (shorter ones are skipped and counted); the
corpus CE bands of random matched-length windows (10th and 50th percentiles, mean ± σ, the
in-distribution threshold mean + 2σ; both CE conventions); the random-prompt baseline (1,024
uniformly random allowed-token prompts) of every objective, for the z-scores of eq. 5.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline import plaindata
from reverie.pipeline.corpus import CorpusStats, corpus_count_columns, corpus_identity, iter_documents
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store, now
from reverie.sae_targets.activations import check_finite_activations, latent_activations, read_latents
from reverie.sae_targets.contexts import Context, hook_activations, iter_contexts, pad_batch
from reverie.sae_targets.loading import Subject, check_latents
from reverie.sae_targets.objectives import Objective, build_objective
from reverie.sae_targets.selection import Target
from reverie.stages.scan.topk import AdaptiveHistogram, BottomKSample, Candidate, QuantileSampler, StreamingTopK, priorities
from reverie.stages.scan.windows import baselines, evaluate_windows, hook_acts_of_prompts, random_prompts
from reverie.stages.scan.search import WindowSet, ce_bands, evaluate_matched, pareto_mask, search_contexts
from reverie.stages.scan.cofire import cooccurrence_top, update_cofiring
from reverie.stages.features import NEIGHBOURS_K, ensure_features, neighbour_rows

log = logging.getLogger("reverie.scan")

SCAN_VERSION = 3  # bump when the scan's definition changes (invalidates cached scans)
N_DECILES = 10
BASELINE_SEED = 0
# salts of the independent pseudo-random streams (see topk.priorities)
MAX_COOC_COUNTS = 50_000_000  # co-occurrence counts (targets × d_sae) the pass keeps at most
_SALT_QUANTILE, _SALT_NONFIRING, _SALT_NONFIRING_POS, _SALT_WINDOW, _SALT_WINDOW_POS = 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------- identity


def scan_latent_ids(latents: Iterable[int] | Iterable[Target]) -> list[int]:
    """Sorted distinct latent ids of ``latents`` (ints, or targets whose latents are flattened)."""
    out: set[int] = set()
    for x in latents:
        out.update(int(i) for i in x.latents) if isinstance(x, Target) else out.add(int(x))
    return sorted(out)


def context_size(cfg: ReverieConfig, subject: Subject) -> int:
    """Tokens per context (BOS included): ``scan.context_size`` or the SAE's."""
    return int(cfg.scan.context_size or subject.context_size)


def scan_settings(cfg: ReverieConfig, subject: Subject) -> dict[str, Any]:
    """Every setting that changes a scan's rows (not batch size or checkpoint cadence)."""
    s = cfg.scan
    return {
        "version": SCAN_VERSION, "context_size": context_size(cfg, subject), "prepend_bos": subject.prepend_bos,
        "max_tokens": s.max_tokens, "top_k": s.top_k, "example_window": s.example_window,
        "quantile_samples": s.quantile_samples, "random_samples": s.random_samples, "hist_bins": s.hist_bins,
        "window_ce_samples": s.window_ce_samples, "baseline_prompts": s.baseline_prompts,
        "random_prompt_examples": s.random_prompt_examples, "window_len": cfg.dream.n_tokens,
        "window_search_top": s.window_search_top, "matched_windows": True,
        "cooccurrence_window": s.cooccurrence_window, "hard_negative_samples": s.hard_negative_samples,
        "hard_negative_neighbours": s.hard_negative_neighbours,
        "rank_quantity": cfg.targets.quantity, "density_quantity": "post", "hist_quantity": "post",
        "objective": {"reduce": cfg.targets.reduce, "p": cfg.targets.p, "offset": cfg.targets.offset},
    }


def scan_key(cfg: ReverieConfig, subject: Subject, latents: Iterable[int] | Iterable[Target]) -> str:
    """Content hash naming a scan: model, SAE, hook, corpus identity, scan settings, latent set, dream
    length, and the model backend when it is not 'hooked' (``model.backend``).

    An unchanged scan is reused across runs. Combination objectives are not part of the key:
    their baselines are added to an existing scan when first needed (:func:`run_scan`).

    Args:
        latents: latent ids or targets (their latents are flattened); ignored when ``scan.all_latents``.
    Returns:
        'scan-' + 16 hex chars.
    Raises:
        LoadError: the local corpus is missing.
    """
    ids = list(range(subject.d_sae)) if cfg.scan.all_latents else scan_latent_ids(latents)
    blob = {
        "model": subject.model_key, "sae": subject.sae_key, "hook": subject.hook_name,
        # content hashes of the weights (issue 16): a file replaced in place is a new scan
        "model_sha": getattr(subject, "model_sha", None), "sae_sha": getattr(subject, "sae_sha", None),
        "corpus": corpus_identity(cfg.scan.corpus), "settings": scan_settings(cfg, subject), "latents": ids,
    }
    if getattr(subject, "backend", "hooked") != "hooked":   # TransformerBridge: its own scans (hooked keys unchanged)
        blob["backend"] = subject.backend
    return "scan-" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- streaming state


@dataclass
class ScanState:
    """Everything a scan accumulates; stored as plain data in ``scan_checkpoints`` (size independent of corpus length).

    Attributes:
        latents: latent ids, one slot each.
        tokens_seen: corpus tokens processed (BOS excluded). n_contexts: contexts processed.
        last_doc / last_start: the last processed context's document index and token start (resume point).
        n_firing: int64 [L] tokens with post-activation > 0. sum_post: float64 [L] their post-activation sum.
    """

    latents: list[int]
    top_k: int
    hist_bins: int
    quantile_samples: int
    random_samples: int
    window_samples: int
    tokens_seen: int = 0
    n_contexts: int = 0
    n_batches: int = 0
    last_doc: int = -1
    last_start: int = -1
    wall_s: float = 0.0
    n_firing: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_post: np.ndarray = field(default=None)  # type: ignore[assignment]
    topk: StreamingTopK = field(default=None)  # type: ignore[assignment]
    hist: AdaptiveHistogram = field(default=None)  # type: ignore[assignment]
    quantiles: QuantileSampler = field(default=None)  # type: ignore[assignment]
    nonfiring: BottomKSample = field(default=None)  # type: ignore[assignment]
    windows: BottomKSample = field(default=None)  # type: ignore[assignment]
    corpus_counts: dict = field(default_factory=dict)  # pipeline.corpus.CorpusStats.counts of the pass
    # co-firing with all d_sae latents (stages.scan.cofire): co-occurrence counts and hard negatives
    cooc_window: int = 0
    hard_negative_samples: int = 0
    n_cooc_windows: int = 0
    cooc: np.ndarray | None = None       # int64 [L, d_sae] windows where slot j and latent k both fire
    win_fires: np.ndarray | None = None  # int64 [d_sae] windows where latent k fires
    hardneg: BottomKSample | None = None
    hn_ids: np.ndarray | None = None     # int64 [L, K] decoder-cosine neighbours of each slot

    def __post_init__(self) -> None:
        L = len(self.latents)
        if self.topk is None:
            self.n_firing = np.zeros(L, dtype=np.int64)
            self.sum_post = np.zeros(L, dtype=np.float64)
            self.topk = StreamingTopK(L, self.top_k)
            self.hist = AdaptiveHistogram(L, self.hist_bins)
            self.quantiles = QuantileSampler(L, self.quantile_samples)
            self.nonfiring = BottomKSample(self.random_samples)
            self.windows = BottomKSample(self.window_samples)
            self.hardneg = BottomKSample(self.hard_negative_samples)


def _shown(n_ids: int, pos: int, width: int, body0: int) -> tuple[int, int]:
    """[start, end) of the shown window around ``pos``: most tokens before it, ~width/6 after."""
    after = width // 6
    start = max(body0, pos - (width - 1 - after))
    end = min(n_ids, start + width)
    return start, end


def _example(ids: list[int], rank: np.ndarray, post: np.ndarray, pos: int, width: int, window_len: int, body0: int,
             context: bool = False) -> dict[str, Any]:
    """Payload of one example: the shown tokens, their activations, and the dream-length window ending at ``pos``.

    The window is exactly ``window_len`` tokens, or empty when the context has fewer corpus tokens
    before ``pos`` (never a shorter window). ``context``: also keep the whole context's ids
    (int32, BOS first) for the window search.
    """
    start, end = _shown(len(ids), pos, width, body0)
    out = {
        "pos": pos, "start": start, "token_ids": ids[start:end], "acts": rank[start:end].copy(),
        "post_acts": post[start:end].copy(), "max_pos": pos - start, "max_act": float(rank[pos]),
        "window_ids": ids[pos - window_len + 1 : pos + 1] if pos - window_len + 1 >= body0 else [],
    }
    if context:
        out["context_ids"] = np.asarray(ids, dtype=np.int32)
    return out


def update_state(state: ScanState, contexts: list[Context], rank: np.ndarray, post: np.ndarray, body: np.ndarray,
                 example_window: int, window_len: int, body0: int) -> None:
    """Merge one batch into the streaming state.

    Args:
        contexts: the batch's contexts, in stream order (context index = state.n_contexts + b).
        rank: float32 [B, T, L] ranking quantity; post: float32 [B, T, L] post-activation.
        body: bool [B, T], True on corpus tokens (not BOS, not padding).
    """
    B = len(contexts)
    lat = np.asarray(state.latents, dtype=np.int64)
    ctx_idx = state.n_contexts + np.arange(B, dtype=np.int64)
    firing = (post > 0) & body[..., None]
    state.n_firing += firing.sum(axis=(0, 1))
    state.sum_post += np.where(firing, post, 0.0).sum(axis=(0, 1), dtype=np.float64)
    fb, ft, fj = np.nonzero(firing)
    state.hist.add(fj, post[fb, ft, fj])

    r = np.where(body[..., None], rank, -np.inf)
    vmax = r.max(axis=1)  # [B, L]
    amax = r.argmax(axis=1)
    ids = [c.ids for c in contexts]

    # top-k: only candidates that can enter, best first
    thr = state.topk.thresholds()
    cb, cj = np.nonzero(vmax >= thr[None, :])
    for o in np.argsort(-vmax[cb, cj], kind="stable"):
        b, j = int(cb[o]), int(cj[o])
        pos = int(amax[b, j])
        start, end = _shown(len(ids[b]), pos, example_window, body0)
        cand = Candidate(float(vmax[b, j]), int(ctx_idx[b]), pos, (tuple(ids[b][start:end]), pos - start))
        state.topk.offer(j, cand, lambda c, b=b, j=j: _example(ids[b], rank[b, :, j], post[b, :, j], c.pos, example_window, window_len, body0,
                                                                context=True))

    # decile samples among firing contexts
    fires = firing.any(axis=1)  # [B, L]
    if state.quantile_samples > 0:
        pr = priorities(ctx_idx[:, None], lat[None, :], _SALT_QUANTILE)
        for b, j in zip(*np.nonzero(fires)):
            b, j = int(b), int(j)
            state.quantiles.offer(j, float(vmax[b, j]), float(pr[b, j]), int(ctx_idx[b]),
                                  lambda b=b, j=j: {**_example(ids[b], rank[b, :, j], post[b, :, j], int(amax[b, j]), example_window, window_len, body0), "context_idx": int(ctx_idx[b])})

    # random non-firing contexts, shown around a random position
    if state.random_samples > 0:
        pr = priorities(ctx_idx[:, None], lat[None, :], _SALT_NONFIRING)
        thr = np.array([state.nonfiring.threshold(j) for j in range(len(lat))])
        pp = priorities(ctx_idx[:, None], lat[None, :], _SALT_NONFIRING_POS)
        for b, j in zip(*np.nonzero(~fires & (pr < thr[None, :]))):
            b, j = int(b), int(j)
            n_body = len(ids[b]) - body0
            pos = body0 + int(pp[b, j] * n_body)
            state.nonfiring.offer(j, float(pr[b, j]), int(ctx_idx[b]),
                                  lambda b=b, j=j, pos=pos: {**_example(ids[b], rank[b, :, j], post[b, :, j], pos, example_window, window_len, body0), "context_idx": int(ctx_idx[b])})

    # dream-length corpus windows for the corpus CE statistics
    pw = priorities(ctx_idx, 0, _SALT_WINDOW)
    ps = priorities(ctx_idx, 0, _SALT_WINDOW_POS)
    for b in range(B):
        n_body = len(ids[b]) - body0
        if n_body >= window_len and pw[b] < state.windows.threshold(0):
            s = body0 + int(ps[b] * (n_body - window_len + 1))
            state.windows.offer(0, float(pw[b]), int(ctx_idx[b]), lambda b=b, s=s: ids[b][s : s + window_len])

    state.n_contexts += B
    state.tokens_seen += int(body.sum())
    state.last_doc, state.last_start = contexts[-1].doc_idx, contexts[-1].start


def _body0(subject: Subject) -> int:
    return 1 if subject.prepend_bos and subject.bos_id is not None else 0


def _context_stream(cfg: ReverieConfig, subject: Subject, state: ScanState) -> Iterator[Context]:
    """Contexts after the state's resume point (the whole corpus for a fresh state)."""
    first_doc = max(state.last_doc, 0)
    stats = CorpusStats()  # a resume re-reads (and recounts) the corpus before its resume point
    state.corpus_counts = stats.counts
    docs = iter_documents(cfg.scan.corpus, skip=first_doc, stats=stats, on_bad=cfg.scan.on_bad_document)
    ctxs = iter_contexts(subject, docs, context_size(cfg, subject), doc_offset=first_doc)
    if state.last_doc < 0:
        return ctxs
    return (c for c in ctxs if (c.doc_idx, c.start) > (state.last_doc, state.last_start))


def rank_and_post(subject: Subject, x: torch.Tensor, latents: Sequence[int], quantity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranking quantity (``targets.quantity``) and SAE post-activation of ``latents``.

    Args:
        x: [..., d_in] hook activations.
    Returns:
        ``(rank, post)``: float [..., L] each (shared latent-activation function).
    """
    with torch.no_grad():
        la = latent_activations(subject.sae, x, list(latents))
        rank = {"pre": la.pre, "post": la.post}.get(quantity)
        if rank is None:
            rank = read_latents(subject.sae, x, list(latents), quantity)
    return rank, la.post


def batch_activations(subject: Subject, latents: Sequence[int], quantity: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank_and_post` of a batch, the model run only up to the hook's block.

    Args:
        tokens: int64 [B, T].
    Returns:
        ``(rank, post)``: float [B, T, L] each, on the model's device.
    """
    return rank_and_post(subject, hook_activations(subject, tokens), latents, quantity)


def scan_pass(cfg: ReverieConfig, subject: Subject, latents: Sequence[int], state: ScanState | None = None,
              on_checkpoint: Callable[[ScanState], None] | None = None, progress: bool = True) -> ScanState:
    """Stream the corpus once (or from ``state``'s resume point) until ``scan.max_tokens`` corpus tokens.

    Args:
        latents: latent ids to summarize (each gets a slot).
        state: a checkpointed state to resume, or None.
        on_checkpoint: called with the state every ``scan.checkpoint_every`` batches.
        progress: show a tqdm bar (tokens/s).
    Returns:
        The final :class:`ScanState`.
    Raises:
        OfflineError: a hub corpus while offline. LoadError: a bad local corpus.
        ReverieError: the corpus gave no tokens.
    """
    s = cfg.scan
    if state is None:
        state = ScanState(latents=list(latents), top_k=max(s.top_k, s.window_search_top), hist_bins=s.hist_bins, quantile_samples=s.quantile_samples,
                          random_samples=s.random_samples, window_samples=s.window_ce_samples,
                          cooc_window=s.cooccurrence_window, hard_negative_samples=s.hard_negative_samples)
        if s.cooccurrence_window > 0 and len(latents) * subject.d_sae <= MAX_COOC_COUNTS:
            state.cooc = np.zeros((len(latents), subject.d_sae), dtype=np.int64)
            state.win_fires = np.zeros(subject.d_sae, dtype=np.int64)
        elif s.cooccurrence_window > 0:
            log.info("co-occurrence not counted: %d latents × %d = %d counts > %d", len(latents), subject.d_sae,
                     len(latents) * subject.d_sae, MAX_COOC_COUNTS)
            state.cooc_window = 0
        if s.hard_negative_samples > 0:
            from reverie.stages.features import decoder_neighbours

            state.hn_ids = decoder_neighbours(subject.sae, list(latents), s.hard_negative_neighbours)[0]
    body0 = _body0(subject)
    pad = subject.tokenizer.pad_token_id or 0
    stream = _context_stream(cfg, subject, state)
    bar = tqdm(total=s.max_tokens, initial=min(state.tokens_seen, s.max_tokens), unit="tok", unit_scale=True,
               desc="scan", disable=not progress, smoothing=0.1)
    try:
        while state.tokens_seen < s.max_tokens:
            t0 = time.perf_counter()
            batch: list[Context] = []
            pending = 0
            for c in stream:
                batch.append(c)
                pending += len(c.ids) - body0
                if len(batch) >= s.batch_size or state.tokens_seen + pending >= s.max_tokens:
                    break
            if not batch:
                break
            tokens, mask = pad_batch(batch, pad)
            body = mask.clone()
            body[:, :body0] = False
            x = hook_activations(subject, tokens)
            rank, post = rank_and_post(subject, x, state.latents, cfg.targets.quantity)
            check_finite_activations(rank, post, batch, state.latents)
            before, ctx0 = state.tokens_seen, state.n_contexts
            rank_np, post_np = rank.float().cpu().numpy(), post.float().cpu().numpy()
            update_state(state, batch, rank_np, post_np, body.numpy(), s.example_window, cfg.dream.n_tokens, body0)
            if state.cooc is not None or (state.hardneg is not None and state.hardneg.k > 0):
                with torch.no_grad():  # every latent's firing, for co-occurrence and hard negatives (stages.scan.cofire)
                    post_all = latent_activations(subject.sae, x, None).post
                    body_d = body.to(post_all.device)
                    fires_all = (post_all > 0) & body_d[..., None]
                ids_b = [c.ids for c in batch]
                update_cofiring(state, fires_all, post_all, body_d, ctx0 + np.arange(len(batch), dtype=np.int64),
                                lambda b, j, pos: _example(ids_b[b], rank_np[b, :, j], post_np[b, :, j], pos, s.example_window,
                                                           cfg.dream.n_tokens, body0))
            state.n_batches += 1
            state.wall_s += time.perf_counter() - t0
            bar.update(min(state.tokens_seen, s.max_tokens) - min(before, s.max_tokens))
            if on_checkpoint is not None and state.n_batches % s.checkpoint_every == 0:
                on_checkpoint(state)
    finally:
        bar.close()
    if state.tokens_seen == 0:
        raise ReverieError("the scan corpus gave no tokens: check scan.corpus (empty files, wrong text_column?)")
    return state


# ----------------------------------------------------------------------------- results


@dataclass
class ScanResult:
    """Rows of a finished scan, ready for :func:`write_scan` (plain data, picklable)."""

    scan_id: str
    scan_row: dict[str, Any]
    latent_rows: list[dict[str, Any]]
    example_rows: list[dict[str, Any]]
    baseline_rows: list[dict[str, Any]]
    objective_rows: list[dict[str, Any]]
    window_rows: list[dict[str, Any]] = field(default_factory=list)
    neighbour_rows: list[dict[str, Any]] = field(default_factory=list)  # latent_neighbours, kind 'cooccurrence'


class _Decoder:
    """Cached per-token decoding (each id decoded alone, as the report shows tokens)."""

    def __init__(self, subject: Subject):
        self.subject = subject
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        miss = [i for i in dict.fromkeys(ids) if i not in self.cache]
        for i, t in zip(miss, self.subject.decode_tokens(miss)):
            self.cache[i] = t
        return [self.cache[i] for i in ids]


def _example_row(scan_id: str, latent: int, kind: str, rank: int, ex: dict[str, Any], decode: _Decoder,
                 bin: int | None = None, context_idx: int | None = None, window_ce: float | None = None,
                 window_act: float | None = None, window_ce_rest: float | None = None) -> dict[str, Any]:
    ctx = ex.get("context_ids")
    return {
        "scan_id": scan_id, "latent": int(latent), "kind": kind, "rank": int(rank), "bin": bin,
        "context_idx": int(ex.get("context_idx", context_idx if context_idx is not None else -1)),
        "start": int(ex["start"]), "token_ids": [int(i) for i in ex["token_ids"]], "tokens": decode(ex["token_ids"]),
        "acts": np.asarray(ex["acts"], dtype=np.float64).tolist(), "post_acts": np.asarray(ex["post_acts"], dtype=np.float64).tolist(),
        "max_act": float(ex["max_act"]), "max_pos": int(ex["max_pos"]), "window_ids": [int(i) for i in ex["window_ids"]],
        "window_ce": None if window_ce is None or not math.isfinite(window_ce) else float(window_ce),
        "window_act": None if window_act is None or not math.isfinite(window_act) else float(window_act),
        "window_ce_rest": _num(window_ce_rest), "context_ids": None if ctx is None else [int(i) for i in ctx],
        "neighbour": None if ex.get("neighbour") is None else int(ex["neighbour"]), "neighbour_act": _num(ex.get("neighbour_act")),
    }


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def single_objective(subject: Subject, cfg: ReverieConfig, latent: int) -> Objective:
    """The objective of one latent under ``[targets]`` (quantity, reduce)."""
    return build_objective(subject.sae, Target(latents=[int(latent)]), cfg.targets)


def objective_rows(cfg: ReverieConfig, subject: Subject, scan_id: str, combos: Sequence[Target],
                   tops: dict[int, list[list[int]]]) -> list[dict[str, Any]]:
    """Dataset side of combination targets: each combination objective on its latents' top windows.

    Only full-length windows (exactly ``dream.n_tokens``) are used; empty ones (contexts too short) are skipped.

    Args:
        tops: latent → its top examples' dream-length windows (best first; empty = too short).
    Returns:
        ``scan_objective_examples`` rows, ranked by objective value (desc).
    """
    n = cfg.dream.n_tokens
    rows = []
    for t in combos:
        obj = build_objective(subject.sae, t, cfg.targets)
        wins: dict[tuple[int, ...], tuple[int, int]] = {}
        for lat in t.latents:
            for r, w in enumerate(tops.get(int(lat), [])):
                if len(w) == n:
                    wins.setdefault(tuple(w), (int(lat), r))
        keys = list(wins)
        if not keys:
            continue
        ce, ce_rest, values = evaluate_matched(subject, [list(k) for k in keys], [obj])
        vals = values[obj.key]
        order = sorted(range(len(keys)), key=lambda i: (-np.nan_to_num(vals[i], nan=-np.inf), i))
        for rank, i in enumerate(order):
            rows.append({"scan_id": scan_id, "objective_key": obj.key, "rank": rank, "latent": wins[keys[i]][0],
                         "source_rank": wins[keys[i]][1], "window_ids": list(keys[i]),
                         "window_ce": _num(ce[i]), "window_act": _num(vals[i]), "window_ce_rest": _num(ce_rest[i])})
    return rows


def window_rows(subject: Subject, scan_id: str, objective: Objective, ws: WindowSet, owners: Sequence[tuple[int, int, int]],
                decode: "_Decoder", members: Sequence[Objective] = ()) -> list[dict[str, Any]]:
    """``scan_windows`` rows: the Pareto frontier (activation vs CE, either convention) of searched windows.

    Args:
        ws: the searched windows, with ``objective``'s values.
        owners: per searched context (``ws.source``): ``(latent, top rank, context_idx)``.
        members: for a combination, each member latent's own objective, evaluated on the frontier
            windows (``latent_acts``, member order).
    Returns:
        rows ranked by CE over all tokens (ascending).
    """
    if not len(ws):
        return []
    act = ws.values[objective.key]
    f_all = pareto_mask(act, ws.ce)
    f_rest = pareto_mask(act, ws.ce_rest) if np.isfinite(ws.ce_rest).any() else np.zeros(len(ws), dtype=bool)
    idx = np.flatnonzero(f_all | f_rest)
    idx = idx[np.lexsort((idx, -act[idx], ws.ce[idx]))]
    member_acts = None
    if members:
        _, _, mv = evaluate_matched(subject, ws.windows[idx], list(members))
        member_acts = np.stack([mv[m.key] for m in members], axis=1)
    rows = []
    for r, i in enumerate(idx):
        lat, src_rank, ctx = owners[int(ws.source[i])]
        w = [int(x) for x in ws.windows[i]]
        rows.append({"scan_id": scan_id, "objective_key": objective.key, "rank": r, "latent": int(lat), "source_rank": int(src_rank),
                     "context_idx": int(ctx), "end_pos": int(ws.end_pos[i]), "window_ids": w, "tokens": decode(w),
                     "window_ce": float(ws.ce[i]), "window_ce_rest": _num(ws.ce_rest[i]), "window_act": float(act[i]),
                     "latent_acts": None if member_acts is None else [_num(v) for v in member_acts[r]],
                     "frontier_all": bool(f_all[i]), "frontier_rest": bool(f_rest[i])})
    return rows


def combo_window_rows(cfg: ReverieConfig, subject: Subject, scan_id: str, combos: Sequence[Target],
                      contexts: dict[int, list[tuple[int, int, Sequence[int]]]], decode: "_Decoder") -> list[dict[str, Any]]:
    """Searched dataset frontier of each combination objective over its latents' top contexts.

    Args:
        contexts: latent → ``(top rank, context_idx, context ids)`` of its searched top contexts.
    """
    rows = []
    for t in combos:
        obj = build_objective(subject.sae, t, cfg.targets)
        owners, ctxs, seen = [], [], set()
        for lat in t.latents:
            for r, ci, ids in contexts.get(int(lat), []):
                if int(ci) not in seen:
                    seen.add(int(ci))
                    owners.append((int(lat), int(r), int(ci)))
                    ctxs.append(ids)
        ws, _ = search_contexts(subject, ctxs, [obj], cfg.dream.n_tokens, _body0(subject))
        rows += window_rows(subject, scan_id, obj, ws, owners, decode, members=[single_objective(subject, cfg, lat) for lat in t.latents])
    return rows


def baseline_rows(subject: Subject, scan_id: str, objectives: Sequence[Objective], n: int, length: int) -> list[dict[str, Any]]:
    """``baselines`` rows: random-prompt mean/σ/max of each objective (paper §3.5)."""
    prompts = random_prompts(subject, n, length, BASELINE_SEED)
    return [{"scan_id": scan_id, "objective_key": b.objective_key, "n": b.n, "length": b.length, "mean": b.mean, "std": b.std, "max": b.max}
            for b in baselines(subject, prompts, objectives)]


def random_prompt_rows(cfg: ReverieConfig, subject: Subject, scan_id: str, latents: Sequence[int], decode: _Decoder) -> list[dict[str, Any]]:
    """The first ``scan.random_prompt_examples`` baseline prompts as ``kind='random_prompt'`` examples per latent.

    Per-token activations (ranking quantity and post-activation), CE after BOS, and each
    latent's objective; the explain stage uses them as negatives when scoring on dreams.
    """
    m = cfg.scan.random_prompt_examples
    if m <= 0:
        return []
    prompts = random_prompts(subject, cfg.scan.baseline_prompts, cfg.dream.n_tokens, BASELINE_SEED)[:m]
    body0 = _body0(subject)
    x = torch.cat(hook_acts_of_prompts(subject, prompts))
    rank, post = [a[:, body0:].float().cpu().numpy() for a in rank_and_post(subject, x, latents, cfg.targets.quantity)]
    objs = [single_objective(subject, cfg, lat) for lat in latents]
    ev = evaluate_windows(subject, prompts.tolist(), objs)
    rows = []
    for j, (lat, obj) in enumerate(zip(latents, objs)):
        for i, p in enumerate(prompts.tolist()):
            ex = {"start": body0, "token_ids": p, "acts": rank[i, :, j], "post_acts": post[i, :, j], "max_act": float(rank[i, :, j].max()),
                  "max_pos": int(rank[i, :, j].argmax()), "window_ids": p}
            rows.append(_example_row(scan_id, lat, "random_prompt", i, ex, decode, context_idx=i,
                                     window_ce=float(ev.ce[i]), window_act=float(ev.values[obj.key][i])))
    return rows


def finish_scan(cfg: ReverieConfig, subject: Subject, scan_id: str, state: ScanState, combos: Sequence[Target] = ()) -> ScanResult:
    """Turn a finished streaming state into rows: searched matched-length windows, corpus CE bands, baselines.

    Per latent, every full-length window ending at every position of its first
    ``scan.window_search_top`` top contexts is evaluated alone after BOS (issue 17 §2) and the
    Pareto frontier of those windows is kept (``scan_windows``); contexts too short for one
    window are counted (``scan_latents.n_short_contexts``).

    Args:
        combos: combination targets whose objective gets a baseline and dataset-side rows.
    Returns:
        :class:`ScanResult`.
    """
    t0 = time.perf_counter()
    n = cfg.dream.n_tokens
    body0 = _body0(subject)
    S = cfg.scan.window_search_top
    decode = _Decoder(subject)
    latent_rows, example_rows, w_rows, tops, contexts = [], [], [], {}, {}
    nb_rows: list[dict[str, Any]] = []
    for j, lat in enumerate(state.latents):
        cands = state.topk.result(j)  # max(top_k, window_search_top) contexts; the first top_k are stored as examples
        top = [c.payload for c in cands[: cfg.scan.top_k]]
        obj = single_objective(subject, cfg, lat)
        full = [r for r, e in enumerate(top) if len(e["window_ids"]) == n]
        ce, ce_rest, vals = evaluate_matched(subject, [top[r]["window_ids"] for r in full], [obj])
        win = {r: (ce[k], ce_rest[k], vals[obj.key][k]) for k, r in enumerate(full)}
        tops[lat] = [e["window_ids"] for e in top]
        for r, (c, e) in enumerate(zip(cands, top)):
            wc, wr, wa = win.get(r, (None, None, None))
            example_rows.append(_example_row(scan_id, lat, "top", r, e, decode, context_idx=c.context_idx,
                                             window_ce=wc, window_act=wa, window_ce_rest=wr))
        searched = [(r, c.context_idx, c.payload["context_ids"]) for r, c in enumerate(cands[:S])]
        contexts[lat] = searched
        ws, n_short = search_contexts(subject, [ids for _, _, ids in searched], [obj], n, body0)
        w_rows += window_rows(subject, scan_id, obj, ws, [(lat, r, ci) for r, ci, _ in searched], decode)
        vmax = top[0]["max_act"] if top else 0.0
        rank = 0
        for d, exs in enumerate(state.quantiles.deciles(j, vmax, N_DECILES)):
            for e in exs:
                example_rows.append(_example_row(scan_id, lat, "quantile", rank, e, decode, bin=d))
                rank += 1
        for r, e in enumerate(state.nonfiring.items(j)):
            example_rows.append(_example_row(scan_id, lat, "random", r, e, decode))
        if getattr(state, "hardneg", None) is not None:
            for r, e in enumerate(state.hardneg.items(j)):
                example_rows.append(_example_row(scan_id, lat, "hard_negative", r, e, decode))
        if getattr(state, "cooc", None) is not None:
            ids, jac, counts = cooccurrence_top(state, j, NEIGHBOURS_K)
            nb_rows += neighbour_rows(scan_id, "cooccurrence", lat, ids, jac, counts)
        nf = int(state.n_firing[j])
        wact = ws.values[obj.key] if len(ws) else np.zeros(0)
        latent_rows.append({
            "scan_id": scan_id, "latent": int(lat), "n_tokens": int(state.tokens_seen), "n_firing": nf,
            "density": nf / state.tokens_seen if state.tokens_seen else 0.0, "max_act": float(vmax) if top else None,
            "mean_act": float(state.sum_post[j] / nf) if nf else None,
            "hist_edges": state.hist.edges(j), "hist_counts": [int(c) for c in state.hist.counts[j]] if state.hist.width[j] > 0 else [],
            "window_max": float(np.nanmax(wact)) if len(wact) and np.isfinite(wact).any() else None,
            "n_windows_searched": int(len(ws)), "n_contexts_searched": len(searched), "n_short_contexts": int(n_short),
        })
        if n_short:
            log.info("latent %d: %d of %d searched top contexts are shorter than %d tokens (skipped)", lat, n_short, len(searched), n)

    wins = [w for w in state.windows.items(0) if len(w) == n]
    ce, ce_rest, _ = evaluate_matched(subject, wins, []) if wins else (np.zeros(0), np.zeros(0), {})
    b_all, b_rest = ce_bands(ce), ce_bands(ce_rest)
    objectives = [single_objective(subject, cfg, lat) for lat in state.latents]
    objectives += [build_objective(subject.sae, t, cfg.targets) for t in combos]
    b_rows = baseline_rows(subject, scan_id, objectives, cfg.scan.baseline_prompts, n)
    example_rows += random_prompt_rows(cfg, subject, scan_id, state.latents, decode)
    o_rows = objective_rows(cfg, subject, scan_id, combos, tops)
    w_rows += combo_window_rows(cfg, subject, scan_id, combos, contexts, decode)
    scan_row = {
        "status": "done", "tokens_seen": int(state.tokens_seen), "n_contexts": int(state.n_contexts), "window_len": n,
        "ce_mean": b_all["mean"], "ce_std": b_all["std"], "n_ce_windows": int(b_all["n"]), "in_dist_threshold": b_all["in_dist"],
        "ce_p10": b_all["p10"], "ce_p50": b_all["p50"], "ce_rest_mean": b_rest["mean"], "ce_rest_std": b_rest["std"],
        "ce_rest_p10": b_rest["p10"], "ce_rest_p50": b_rest["p50"], "ce_rest_in_dist_threshold": b_rest["in_dist"],
        "wall_s": state.wall_s + time.perf_counter() - t0, "pass_wall_s": state.wall_s, "updated_at": now(),
        # documents = those the pass used (up to its last context), not those the reader looked ahead to:
        # the same number whether or not the scan was interrupted and resumed
        **corpus_count_columns({**(state.corpus_counts or {}), "documents": int(state.last_doc) + 1}),
        "cooc_window": int(state.cooc_window) if getattr(state, "cooc", None) is not None else None,
        "n_cooc_windows": int(state.n_cooc_windows) if getattr(state, "cooc", None) is not None else None,
    }
    return ScanResult(scan_id, scan_row, latent_rows, example_rows, b_rows, o_rows, w_rows, nb_rows)


# ----------------------------------------------------------------------------- writes


def _start_row(cfg: ReverieConfig, subject: Subject, scan_id: str, latents: Sequence[int]) -> dict[str, Any]:
    t = now()
    return {
        "scan_id": scan_id, "model_key": subject.model_key, "sae_key": subject.sae_key, "hook_name": subject.hook_name,
        "corpus_json": json.dumps(corpus_identity(cfg.scan.corpus), sort_keys=True),
        "settings_json": json.dumps(scan_settings(cfg, subject), sort_keys=True), "latents": [int(i) for i in latents],
        "status": "running", "tokens_seen": 0, "n_contexts": 0, "window_len": cfg.dream.n_tokens,
        "created_at": t, "updated_at": t,
    }


# the classes a checkpoint may hold (plain data: nothing else is ever rebuilt from the database)
CHECKPOINT_CLASSES = (ScanState, StreamingTopK, Candidate, AdaptiveHistogram, QuantileSampler, BottomKSample)


def write_checkpoint(store: Store, scan_id: str, state: ScanState) -> None:
    """Store the streaming state as plain data (:func:`pipeline.plaindata.dumps`, never a pickle)
    and the progress, in one transaction."""
    blob = plaindata.dumps(state, CHECKPOINT_CLASSES)
    with store.transaction():
        store.replace("scan_checkpoints", {"scan_id": scan_id}, [{"scan_id": scan_id, "state": blob, "updated_at": now()}])
        store.execute("UPDATE scans SET tokens_seen = ?, n_contexts = ?, updated_at = ? WHERE scan_id = ?",
                      [state.tokens_seen, state.n_contexts, now(), scan_id])
    log.info("checkpoint %s: %d tokens, %d contexts, %d batches (%d bytes)", scan_id, state.tokens_seen, state.n_contexts, state.n_batches, len(blob))


def load_checkpoint(store: Store, scan_id: str) -> ScanState | None:
    """The checkpointed state of a scan, or None (no checkpoint, or one that is not reverie plain
    data, e.g. an old or planted pickle: it is never loaded, a warning says so, and the scan
    starts over). Reading runs no code from the database (:func:`pipeline.plaindata.loads`)."""
    row = store.fetch_one("SELECT state FROM scan_checkpoints WHERE scan_id = ?", [scan_id])
    if row is None:
        return None
    try:
        state = plaindata.loads(row["state"], CHECKPOINT_CLASSES)
    except plaindata.PlainDataError as e:
        log.warning("ignoring the checkpoint of scan %s: %s; the scan starts over", scan_id, e)
        return None
    if not isinstance(state, ScanState):
        log.warning("ignoring the checkpoint of scan %s: it holds a %s, not a scan state", scan_id, type(state).__name__)
        return None
    return state


def write_scan(store: Store, result: ScanResult) -> None:
    """Write a finished scan's rows and mark it done, in one transaction (idempotent)."""
    sid = result.scan_id
    with store.transaction():
        for table, rows in (("scan_latents", result.latent_rows), ("scan_examples", result.example_rows),
                            ("baselines", result.baseline_rows), ("scan_objective_examples", result.objective_rows),
                            ("scan_windows", result.window_rows)):
            store.replace(table, {"scan_id": sid}, rows)
        store.replace("latent_neighbours", {"source_id": sid}, result.neighbour_rows)
        sets = ", ".join(f'"{k}" = ?' for k in result.scan_row)
        store.execute(f"UPDATE scans SET {sets} WHERE scan_id = ?", [*result.scan_row.values(), sid])
        store.delete("scan_checkpoints", {"scan_id": sid})


def add_missing_objectives(cfg: ReverieConfig, subject: Subject, store: Store, scan_id: str, targets: Sequence[Target]) -> int:
    """Add baselines and dataset-side rows for targets' objectives a finished scan lacks (new combinations).

    Returns:
        Number of objectives added.
    """
    have = {r["objective_key"] for r in store.fetch("SELECT objective_key FROM baselines WHERE scan_id = ?", [scan_id])}
    missing = [t for t in targets if build_objective(subject.sae, t, cfg.targets).key not in have]
    if not missing:
        return 0
    objs = [build_objective(subject.sae, t, cfg.targets) for t in missing]
    b_rows = baseline_rows(subject, scan_id, objs, cfg.scan.baseline_prompts, cfg.dream.n_tokens)
    combos = [t for t in missing if t.is_combination]
    tops: dict[int, list[list[int]]] = {}
    contexts: dict[int, list[tuple[int, int, Sequence[int]]]] = {}
    for r in store.fetch("SELECT latent, rank, context_idx, window_ids, context_ids FROM scan_examples WHERE scan_id = ? AND kind = 'top' "
                         "ORDER BY latent, rank", [scan_id]):
        tops.setdefault(int(r["latent"]), []).append(list(r["window_ids"] or []))
        if r["context_ids"] is not None and int(r["rank"]) < cfg.scan.window_search_top:
            contexts.setdefault(int(r["latent"]), []).append((int(r["rank"]), int(r["context_idx"]), list(r["context_ids"])))
    o_rows = objective_rows(cfg, subject, scan_id, combos, tops)
    w_rows = combo_window_rows(cfg, subject, scan_id, combos, contexts, _Decoder(subject))
    with store.transaction():
        for b in b_rows:
            store.replace("baselines", {"scan_id": scan_id, "objective_key": b["objective_key"]}, [b])
        for key in {r["objective_key"] for r in o_rows}:
            store.replace("scan_objective_examples", {"scan_id": scan_id, "objective_key": key}, [r for r in o_rows if r["objective_key"] == key])
        for key in {r["objective_key"] for r in w_rows}:
            store.replace("scan_windows", {"scan_id": scan_id, "objective_key": key}, [r for r in w_rows if r["objective_key"] == key])
    return len(missing)


def run_scan(cfg: ReverieConfig, subject: Subject, store: Store, targets: list[Target], progress: bool = True) -> str:
    """Scan the corpus for ``targets`` (reusing or resuming a scan with the same key) and store it.

    A finished scan with the same :func:`scan_key` is returned at once (objectives it lacks,
    e.g. a new combination, are added); a checkpointed one resumes from its checkpoint.
    Checkpoints are written every ``scan.checkpoint_every`` batches (one transaction each);
    the final rows in one transaction.

    Returns:
        The scan id.
    Raises:
        TargetError: a latent id outside the SAE. OfflineError / LoadError: corpus unavailable.
    """
    latents = list(range(subject.d_sae)) if cfg.scan.all_latents else scan_latent_ids(targets)
    check_latents(latents, subject.d_sae)
    sid = scan_key(cfg, subject, latents)
    ensure_features(subject, store, scan_latent_ids(targets))  # logit lens + decoder neighbours, once per (SAE, latent)
    row = store.fetch_one("SELECT status FROM scans WHERE scan_id = ?", [sid])
    if row is not None and row["status"] == "done":
        added = add_missing_objectives(cfg, subject, store, sid, targets)
        log.info("scan %s already done: reused%s", sid, f" ({added} objectives added)" if added else "")
        return sid
    state = load_checkpoint(store, sid) if row is not None else None
    if state is not None and list(state.latents) != list(latents):
        state = None
    if state is not None:
        log.info("resuming scan %s from its checkpoint: %d tokens, %d contexts", sid, state.tokens_seen, state.n_contexts)
    else:
        store.replace("scans", {"scan_id": sid}, [_start_row(cfg, subject, sid, latents)])
    state = scan_pass(cfg, subject, latents, state, on_checkpoint=lambda st: write_checkpoint(store, sid, st), progress=progress)
    n_win, n_tok = len(state.windows.items(0)), cfg.dream.n_tokens  # the corpus CE needs ≥ 2 dream-length windows
    if n_win < 2 and cfg.scan.window_ce_samples >= 2:
        raise ReverieError(
            f"the corpus is too short for the scan: {state.tokens_seen} tokens in {state.n_contexts} contexts hold {n_win} "
            f"window(s) of the dream length (dream.n_tokens = {n_tok} tokens); the corpus CE mean ± σ needs at least 2. "
            "Use a larger corpus (scan.corpus), raise scan.max_tokens, or lower dream.n_tokens.")
    result = finish_scan(cfg, subject, sid, state, [t for t in targets if t.is_combination])
    write_scan(store, result)
    log.info("scan %s done: %d tokens, %d contexts, corpus window CE %s ± %s", sid, state.tokens_seen, state.n_contexts,
             result.scan_row["ce_mean"], result.scan_row["ce_std"])
    return sid
