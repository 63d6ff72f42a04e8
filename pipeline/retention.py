"""Retention (issue 15): ``reverie gc --keep-nights N`` drops old nights' bulky rows.

A night older than the N most recent nightly runs loses its frontier histories
(``dream_history``), token attributions (``dream_attributions``), all but its top
``keep_prompts`` frontier prompts per dream (``dream_prompts``) and its LLM call log
(``llm_calls``); a scan that only such nights used loses its samples (``scan_examples``,
``scan_windows``, ``scan_objective_examples``) and its checkpoint. Every summary stays: runs,
targets, units, dream_runs, comparisons, explanations and scores, scan_latents, baselines, and
each night's ``atlas_latents`` rows (written first if missing), so the atlas still lists every
latent ever explained. Dropped runs get ``runs.gc_at``; they are never a source of cross-night
reuse again. DuckDB does not shrink its file on DELETE, so :func:`compact` rewrites it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import DB_NAME, Store, now


@dataclass
class GcResult:
    """What ``gc`` did: nights kept and collected, rows dropped per table, file sizes in bytes."""

    kept: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    size_before: int = 0
    size_after: int = 0


def db_size(project_dir: str | Path) -> int:
    """Bytes of the project's database file plus its write-ahead log (0 when absent)."""
    p = Path(project_dir) / DB_NAME
    return sum(f.stat().st_size for f in (p, p.with_name(p.name + ".wal")) if f.exists())


def _count(store: Store, sql: str, params: list) -> int:
    return int(store.fetch_one(f"SELECT count(*) AS n FROM ({sql})", params)["n"])


def collect(cfg: ReverieConfig, store: Store, keep_nights: int, keep_prompts: int = 3) -> GcResult:
    """Drop the bulky rows of every nightly run older than the ``keep_nights`` most recent ones
    (by start time), in one transaction.

    Args:
        keep_nights: nightly runs whose rows stay whole (>= 1).
        keep_prompts: frontier prompts kept per dream of a collected night (highest activation first; >= 0).
    Returns:
        :class:`GcResult` (sizes not filled: see :func:`gc`).
    Raises:
        ReverieError: ``keep_nights`` < 1 or ``keep_prompts`` < 0; StoreWriteError: the database cannot be written.
    """
    from reverie.reports.atlas import record_night

    if keep_nights < 1:
        raise ReverieError(f"--keep-nights must be at least 1 (got {keep_nights}): the latest night always stays whole")
    if keep_prompts < 0:
        raise ReverieError(f"--keep-prompts must be 0 or more (got {keep_prompts})")
    nights = [r["run_id"] for r in store.fetch("SELECT run_id FROM runs WHERE kind = 'nightly' ORDER BY started_at DESC, run_id DESC")]
    res = GcResult(kept=nights[:keep_nights])
    old = nights[keep_nights:]
    if not old:
        return res
    marks = ", ".join("?" for _ in old)
    dreams = f"SELECT dream_id FROM dream_runs WHERE run_id IN ({marks})"
    # scans whose every user is collected (a scan is shared by nights with the same latents and settings)
    scans = (f"SELECT DISTINCT scan_id FROM comparisons WHERE run_id IN ({marks}) "
             f"AND scan_id NOT IN (SELECT scan_id FROM comparisons WHERE run_id NOT IN ({marks}))")
    deletes = {
        "dream_history": (f"dream_id IN ({dreams})", old),
        "dream_attributions": (f"dream_id IN ({dreams})", old),
        "dream_prompts": (f"dream_id IN ({dreams}) AND (dream_id, idx) NOT IN (SELECT dream_id, idx FROM (SELECT dream_id, idx, "
                          f"row_number() OVER (PARTITION BY dream_id ORDER BY activation DESC, idx) AS k FROM dream_prompts "
                          f"WHERE dream_id IN ({dreams})) WHERE k <= ?)", old + old + [keep_prompts]),
        "llm_calls": (f"run_id IN ({marks})", old),
        "scan_examples": (f"scan_id IN ({scans})", old + old),
        "scan_windows": (f"scan_id IN ({scans})", old + old),
        "scan_objective_examples": (f"scan_id IN ({scans})", old + old),
        "scan_checkpoints": (f"scan_id IN ({scans})", old + old),
    }
    with store.transaction():
        have = {r["run_id"] for r in store.fetch(f"SELECT DISTINCT run_id FROM atlas_latents WHERE run_id IN ({marks})", old)}
        for run in old:  # the atlas keeps every latent: its summary rows are written before anything goes
            if run not in have:
                record_night(cfg, store, run)
        for table, (where, params) in deletes.items():
            n = _count(store, f"SELECT 1 FROM {table} WHERE {where}", params)
            if n:
                store.execute(f"DELETE FROM {table} WHERE {where}", params)
            res.dropped[table] = n
        store.execute(f"UPDATE runs SET gc_at = ? WHERE run_id IN ({marks}) AND gc_at IS NULL", [now(), *old])
    res.collected = old
    return res


def compact(project_dir: str | Path) -> None:
    """Rewrite the project's database into a new file (``COPY FROM DATABASE``) and swap it in, so
    the space of deleted rows is given back. Needs the database closed by every other process.

    Raises:
        ReverieError: the database is locked or the copy failed (the original file is kept).
    """
    path = Path(project_dir) / DB_NAME
    tmp = path.with_name(path.name + ".compact")
    if tmp.exists():
        tmp.unlink()
    try:
        con = duckdb.connect(str(path))
        try:
            con.execute("CHECKPOINT")
            src = con.execute("SELECT current_database()").fetchall()[0][0]
            con.execute(f"ATTACH '{tmp}' AS reverie_compact")
            con.execute(f'COPY FROM DATABASE "{src}" TO reverie_compact')
            con.execute("DETACH reverie_compact")
        finally:
            con.close()
    except duckdb.Error as e:
        if tmp.exists():
            tmp.unlink()
        raise ReverieError(f"could not compact {path}: {str(e).splitlines()[0]} (the database is unchanged)") from None
    os.replace(tmp, path)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        wal.unlink()


def gc(cfg: ReverieConfig, keep_nights: int, keep_prompts: int = 3, do_compact: bool = True) -> GcResult:
    """``reverie gc``: :func:`collect` old nights, re-render the atlas, then :func:`compact` the file.

    Returns:
        :class:`GcResult` with the file size (database + WAL, bytes) before and after.
    Raises:
        ReverieError: bad arguments, a locked database; StoreWriteError: it cannot be written.
    """
    from reverie.reports.atlas import render_atlas

    before = db_size(cfg.project.path)
    with Store(cfg.project.path) as store:
        res = collect(cfg, store, keep_nights, keep_prompts)
        if res.collected and "atlas_latents" in store.tables():
            render_atlas(cfg, store)
    if do_compact:
        compact(cfg.project.path)
    res.size_before, res.size_after = before, db_size(cfg.project.path)
    return res
