"""The rows of a scan: what one streamed pass (:func:`stages.scan.stage.scan_pass`) becomes.

:func:`scan_documents` — pass, then :func:`finish_scan` — is the one scan computation: the CLI
and the nightly call it through :func:`stages.scan.store.run_scan` (which adds checkpoints and
writes the rows), the library through :func:`reverie.scan` (texts in memory, no store).
:class:`ScanResult` holds the rows as plain data. Definitions: :mod:`stages.scan.stage`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.corpus import corpus_count_columns
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import now
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective, build_objective
from reverie.sae_targets.selection import Target
from reverie.stages.features import NEIGHBOURS_K, neighbour_rows
from reverie.stages.scan.cofire import cooccurrence_top
from reverie.stages.pareto import pareto_mask
from reverie.stages.scan.search import WindowSet, ce_bands, evaluate_matched, search_contexts
from reverie.stages.scan.stage import (
    BASELINE_SEED, N_DECILES, Documents, ScanState, rank_and_post, scan_pass, scan_settings,
)
from reverie.stages.scan.windows import baselines, evaluate_windows, hook_acts_of_prompts, random_prompts

log = logging.getLogger("reverie.scan")


@dataclass
class ScanResult:
    """Rows of a finished scan (plain data, picklable): what :func:`stages.scan.store.write_scan`
    stores and :func:`reverie.scan` returns. Each list holds the rows of one table.

    Attributes:
        scan_id: 'scan-' + 16 hex chars (:func:`stages.scan.stage.scan_key`).
        scan_row: the ``scans`` columns of the finished scan: tokens and contexts seen, the window
            length (tokens), corpus window CE bands in nats/token (``ce_p10``, ``ce_p50``, ``ce_mean``,
            ``ce_std``, ``in_dist_threshold``, and ``ce_rest_*`` without the first token), corpus counts.
        latent_rows: ``scan_latents``, one per latent: density (fraction of corpus tokens with
            post-activation > 0), max / mean activation, histogram, best matched window (``window_max``).
        example_rows: ``scan_examples``: kind 'top' (ranked by the ranking quantity at the max
            token), 'quantile' (decile samples), 'random' (non-firing), 'hard_negative', 'random_prompt'.
        baseline_rows: ``baselines``: random-prompt mean / σ / max per objective (paper §3.5).
        objective_rows: ``scan_objective_examples`` (combinations on their latents' top windows).
        window_rows: ``scan_windows``: the Pareto frontier of searched matched-length windows per objective.
        neighbour_rows: ``latent_neighbours`` of kind 'cooccurrence'.
        settings: :func:`stages.scan.stage.scan_settings` (ranking quantity, objective reduce / p / offset, ...).
    """

    scan_id: str
    scan_row: dict[str, Any]
    latent_rows: list[dict[str, Any]]
    example_rows: list[dict[str, Any]]
    baseline_rows: list[dict[str, Any]]
    objective_rows: list[dict[str, Any]]
    window_rows: list[dict[str, Any]] = field(default_factory=list)
    neighbour_rows: list[dict[str, Any]] = field(default_factory=list)  # latent_neighbours, kind 'cooccurrence'
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def latents(self) -> list[int]:
        """The scanned latent ids, ascending."""
        return sorted(int(r["latent"]) for r in self.latent_rows)

    def examples(self, latent: int, kind: str = "top") -> list[dict[str, Any]]:
        """One latent's example rows of one kind, by rank ('top': highest activation first).

        Raises:
            KeyError: ``latent`` was not scanned.
        """
        if int(latent) not in self.latents:
            raise KeyError(f"latent {latent} is not in this scan (latents: {self.latents})")
        return sorted((e for e in self.example_rows if e["latent"] == int(latent) and e["kind"] == kind), key=lambda e: e["rank"])

    def top_texts(self, latent: int, n: int = 5) -> list[str]:
        """The shown text of a latent's ``n`` best top examples (tokens joined)."""
        return ["".join(e["tokens"]) for e in self.examples(latent)[:n]]

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able plain data (lists and dicts; timestamps as ISO 8601 text)."""
        return _jsonable(asdict(self))

    def to_pandas(self, table: str = "latents"):
        """One table as a ``pandas.DataFrame``: 'latents' (default), 'examples', 'windows', 'baselines',
        'objectives' or 'neighbours'.

        Raises:
            ValueError: unknown ``table``.
        """
        import pandas as pd

        rows = {"latents": self.latent_rows, "examples": self.example_rows, "windows": self.window_rows, "baselines": self.baseline_rows,
                "objectives": self.objective_rows, "neighbours": self.neighbour_rows}.get(table)
        if rows is None:
            raise ValueError(f"table {table!r}: use latents, examples, windows, baselines, objectives or neighbours")
        return pd.DataFrame(rows)


def _jsonable(x: Any) -> Any:
    """``x`` with datetimes as ISO text and numpy scalars as Python numbers (containers recursed)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return x.item() if isinstance(x, np.generic) else x


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
        ws, _ = search_contexts(subject, ctxs, [obj], cfg.dream.n_tokens, subject.n_bos)
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
    body0 = subject.n_bos
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
    body0 = subject.n_bos
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
    return ScanResult(scan_id, scan_row, latent_rows, example_rows, b_rows, o_rows, w_rows, nb_rows, scan_settings(cfg, subject))


def scan_documents(cfg: ReverieConfig, subject: Subject, latents: Sequence[int], scan_id: str, combos: Sequence[Target] = (), *,
                   documents: Documents | None = None, state: ScanState | None = None,
                   on_checkpoint: Callable[[ScanState], None] | None = None, progress: bool = True) -> ScanResult:
    """The whole scan of ``latents`` over a corpus: the streamed pass (:func:`stages.scan.stage.scan_pass`),
    then the rows (:func:`finish_scan`). No store: the caller persists (or not) the result.

    Args:
        latents: latent ids, ascending, each one slot (targets' latents flattened).
        scan_id: the id the rows carry (:func:`stages.scan.stage.scan_key`).
        combos: combination targets whose objective gets a baseline and dataset-side rows.
        documents: the corpus; None = ``scan.corpus``.
        state: a checkpointed state to resume from; on_checkpoint: called every ``scan.checkpoint_every`` batches.
        progress: show a tqdm bar.
    Returns:
        :class:`ScanResult`.
    Raises:
        ReverieError: the corpus gave no tokens, or fewer than 2 windows of the dream length
            (the corpus CE mean ± σ needs 2). OfflineError / LoadError: corpus unavailable.
        FloatingPointError: NaN/Inf activations.
    """
    state = scan_pass(cfg, subject, latents, state, on_checkpoint=on_checkpoint, progress=progress, documents=documents)
    n_win, n_tok = len(state.windows.items(0)), cfg.dream.n_tokens
    if n_win < 2 and cfg.scan.window_ce_samples >= 2:
        raise ReverieError(
            f"the corpus is too short for the scan: {state.tokens_seen} tokens in {state.n_contexts} contexts hold {n_win} "
            f"window(s) of the dream length (dream.n_tokens = {n_tok} tokens); the corpus CE mean ± σ needs at least 2. "
            "Use a larger corpus (scan.corpus), raise scan.max_tokens, or lower dream.n_tokens.")
    result = finish_scan(cfg, subject, scan_id, state, combos)
    log.info("scan %s done: %d tokens, %d contexts, corpus window CE %s ± %s", scan_id, state.tokens_seen, state.n_contexts,
             result.scan_row["ce_mean"], result.scan_row["ce_std"])
    return result
