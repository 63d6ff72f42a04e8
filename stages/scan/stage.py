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

Modules: this one (identity, the streamed pass, its state); :mod:`~stages.scan.rows` (the rows of
a finished pass: :func:`~stages.scan.rows.finish_scan`, and :func:`~stages.scan.rows.scan_documents`,
the one scan call of the CLI, the nightly and :func:`reverie.scan`); :mod:`~stages.scan.store`
(checkpoints and rows in DuckDB, :func:`~stages.scan.store.run_scan`); :mod:`~stages.scan.memory`
(texts and datasets in memory as the corpus).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.corpus import CorpusStats, corpus_identity, iter_documents
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.hashing import content_key
from reverie.sae_targets.activations import check_finite_activations, latent_activations, read_latents
from reverie.sae_targets.contexts import Context, hook_activations, iter_contexts, pad_batch
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.selection import Target
from reverie.stages.scan.cofire import update_cofiring
from reverie.stages.scan.topk import AdaptiveHistogram, BottomKSample, Candidate, QuantileSampler, StreamingTopK, priorities

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


def scan_key(cfg: ReverieConfig, subject: Subject, latents: Iterable[int] | Iterable[Target], corpus: dict[str, Any] | None = None) -> str:
    """Content hash naming a scan: model, SAE, hook, corpus identity, scan settings, latent set, dream
    length, and the model backend when it is not 'hooked' (``model.backend``).

    An unchanged scan is reused across runs. Combination objectives are not part of the key:
    their baselines are added to an existing scan when first needed (:func:`run_scan`).

    Args:
        latents: latent ids or targets (their latents are flattened); ignored when ``scan.all_latents``.
        corpus: the corpus identity when the documents are not ``scan.corpus`` (texts in memory,
            :func:`stages.scan.memory.texts_identity`); None = ``corpus_identity(scan.corpus)``.
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
        "corpus": corpus if corpus is not None else corpus_identity(cfg.scan.corpus), "settings": scan_settings(cfg, subject), "latents": ids,
    }
    if getattr(subject, "backend", "hooked") != "hooked":   # TransformerBridge: its own scans (hooked keys unchanged)
        blob["backend"] = subject.backend
    return "scan-" + content_key(blob)


#: a corpus as documents from a start index: ``documents(skip, stats)`` yields the texts of documents
#: ``skip, skip + 1, ...``, counting repairs and skips (and every document, ``"documents"``) in ``stats``
Documents = Callable[[int, CorpusStats], Iterator[str]]


def configured_documents(cfg: ReverieConfig) -> Documents:
    """``scan.corpus`` (a local file or a hub dataset) as :data:`Documents` (:func:`pipeline.corpus.iter_documents`)."""
    return lambda skip, stats: iter_documents(cfg.scan.corpus, skip=skip, stats=stats, on_bad=cfg.scan.on_bad_document)


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


def _context_stream(cfg: ReverieConfig, subject: Subject, state: ScanState, documents: Documents) -> Iterator[Context]:
    """Contexts after the state's resume point (the whole corpus for a fresh state)."""
    first_doc = max(state.last_doc, 0)
    stats = CorpusStats()  # a resume re-reads (and recounts) the corpus before its resume point
    state.corpus_counts = stats.counts
    docs = documents(first_doc, stats)
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
              on_checkpoint: Callable[[ScanState], None] | None = None, progress: bool = True,
              documents: Documents | None = None) -> ScanState:
    """Stream the corpus once (or from ``state``'s resume point) until ``scan.max_tokens`` corpus tokens.

    Args:
        latents: latent ids to summarize (each gets a slot).
        state: a checkpointed state to resume, or None.
        documents: the corpus; None = ``scan.corpus`` (:func:`configured_documents`).
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
    body0 = subject.n_bos
    pad = subject.tokenizer.pad_token_id or 0
    stream = _context_stream(cfg, subject, state, documents or configured_documents(cfg))
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


CHECKPOINT_CLASSES = (ScanState, StreamingTopK, Candidate, AdaptiveHistogram, QuantileSampler, BottomKSample)
