"""The scan stage on the DuckDB store: reuse, checkpoints, resume, rows written in one transaction.

A thin persistence wrapper around :func:`stages.scan.rows.scan_documents` (the library's call):
it looks a scan up by its key, resumes a checkpointed state, writes a checkpoint every
``scan.checkpoint_every`` batches and the finished rows at the end.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from reverie.pipeline import plaindata
from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.corpus import corpus_identity
from reverie.pipeline.store import Store, now
from reverie.sae_targets.loading import Subject, check_latents
from reverie.sae_targets.objectives import build_objective
from reverie.sae_targets.selection import Target
from reverie.stages.features import ensure_features
from reverie.stages.scan.rows import (
    ScanResult, _Decoder, baseline_rows, combo_window_rows, objective_rows, scan_documents,
)
from reverie.stages.scan.stage import CHECKPOINT_CLASSES, ScanState, scan_key, scan_latent_ids, scan_settings

log = logging.getLogger("reverie.scan")


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
    the final rows in one transaction. The scan itself is :func:`stages.scan.rows.scan_documents`.

    Returns:
        The scan id.
    Raises:
        TargetError: a latent id outside the SAE. OfflineError / LoadError: corpus unavailable.
        ReverieError: the corpus is too short (see :func:`stages.scan.rows.scan_documents`).
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
    result = scan_documents(cfg, subject, latents, sid, [t for t in targets if t.is_combination], state=state,
                            on_checkpoint=lambda st: write_checkpoint(store, sid, st), progress=progress)
    write_scan(store, result)
    return sid
