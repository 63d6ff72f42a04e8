"""The units of a nightly run: its ledger (the ``units`` table: what ran, what is done, what failed)
and the summary a run returns (:mod:`pipeline.orchestrate` drives them).
"""

from __future__ import annotations

import datetime as dt
import errno as _errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reverie.pipeline.errors import StoreWriteError
from reverie.pipeline.store import Store

log = logging.getLogger("reverie.nightly")

STAGES = ("targets", "scan", "dream", "compare", "explain", "report", "atlas")
RUN_LEVEL = "*"  # target_id of units that cover the whole run


@dataclass
class NightlySummary:
    """What a nightly run did. ``exit_code`` is 1 when any unit failed.

    ``wall_s`` is this session's seconds, ``total_wall_s`` the run's over every session (resumes
    add up). ``skipped_units`` maps a stage to the target ids of its units that were already
    done and not rerun ('*' = a run-level unit). ``report_reused``: the report's inputs did not
    change since it was last rendered, so it was not rendered again.
    """

    run_id: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    total_wall_s: float = 0.0
    index_html: Path | None = None
    log_file: Path | None = None
    frac_beats: float | None = None
    frac_beats_in_dist: float | None = None
    n_dominates: int | None = None          # single latents where a dream dominates the dataset's best window
    n_dominance_known: int | None = None    # single latents with both dreams and matched dataset windows
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_units: dict[str, list[str]] = field(default_factory=dict)
    report_reused: bool = False
    atlas_html: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


_DISK_ERRNOS = {_errno.ENOSPC, _errno.EROFS, getattr(_errno, "EDQUOT", _errno.ENOSPC)}


class UnitLedger:
    """Reads and writes the ``units`` table of one run (through the store)."""

    def __init__(self, store: Store, run_id: str, summary: NightlySummary):
        self.store, self.run_id, self.summary = store, run_id, summary
        self.ran: set[tuple[str, str]] = set()  # (target_id, stage) of units run or recorded in this session

    def done_units(self) -> dict[str, list[str]]:
        """Stage → target ids of this run's units whose status is 'done' (stage order of STAGES)."""
        rows = self.store.fetch("SELECT stage, target_id FROM units WHERE run_id = ? AND status = 'done' ORDER BY stage, target_id", [self.run_id])
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["stage"], []).append(r["target_id"])
        return dict(sorted(out.items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else len(STAGES)))

    def status(self, target_id: str, stage: str) -> str | None:
        row = self.store.fetch_one("SELECT status FROM units WHERE run_id = ? AND target_id = ? AND stage = ?", [self.run_id, target_id, stage])
        return row["status"] if row else None

    def is_done(self, target_id: str, stage: str) -> bool:
        return self.status(target_id, stage) == "done"

    def record(self, target_id: str, stage: str, status: str, started: dt.datetime, error: str | None = None,
               wall_s: float | None = None) -> None:
        """Write one unit's row (joins the caller's transaction, if any).

        Args:
            status: 'done' | 'failed' | 'skipped'.
            started: when the unit started (naive UTC).
            error: 'ExceptionType: message' of a failed unit (or why it was skipped).
            wall_s: the unit's compute time in seconds (e.g. measured by the executor); None =
                from ``started`` to now.
        """
        ended = now_utc()
        self.ran.add((target_id, stage))
        self.store.replace("units", {"run_id": self.run_id, "target_id": target_id, "stage": stage}, [{
            "run_id": self.run_id, "target_id": target_id, "stage": stage, "status": status,
            "started_at": started, "ended_at": ended, "wall_s": (ended - started).total_seconds() if wall_s is None else float(wall_s),
            "error": error,
        }])
        log.info("unit %s %s: %s%s", stage, target_id, status, f" ({error})" if error else "")
        if status == "done":
            self.summary.done += 1
        elif status == "failed":
            self.summary.failed += 1
            self.summary.failures.append(f"{stage} {target_id}: {error}")
        else:
            self.summary.skipped += 1

    def run(self, target_id: str, stage: str, fn: Callable[[], Any], atomic: bool = True,
            wall_s: float | None = None) -> tuple[bool, Any]:
        """Run ``fn`` as one unit. ``atomic``: its writes and the unit row commit together, or
        neither does. Stages that commit their own progress (the scan's checkpoints, the LLM
        response cache) run with ``atomic=False`` so a kill keeps that progress; a signal stops
        them at once (:func:`pipeline.signals.interruptible`).

        The unit's recorded wall time is ``fn``'s own time (its compute; the unit row's write is
        not counted), or ``wall_s`` when given (compute done elsewhere, e.g. by an executor).

        Returns:
            ``(True, fn's value)``, or ``(False, None)`` when ``fn`` raised (recorded 'failed').
        Raises:
            Interrupted: a signal arrived before or during the unit (nothing of the unit is
                recorded, so a rerun does it again); KeyboardInterrupt and DuckDB's "Query
                interrupted" are re-raised as ``Interrupted``, never recorded as failures.
            StoreWriteError: the database (or, from an ``OSError`` ENOSPC / EROFS / EDQUOT, any
                file such as a report) cannot be written: fatal for the run, raised without
                recording the unit (that write would fail too).
        """
        from reverie.pipeline.signals import as_interrupted, check_interrupt, interruptible, is_interrupt

        check_interrupt()
        started = now_utc()
        t0 = time.perf_counter()
        try:
            if atomic:
                with self.store.transaction():
                    out = fn()
                    took = time.perf_counter() - t0
                    self.record(target_id, stage, "done", started, wall_s=took if wall_s is None else wall_s)
            else:
                with interruptible():
                    out = fn()
                took = time.perf_counter() - t0
                self.record(target_id, stage, "done", started, wall_s=took if wall_s is None else wall_s)
            return True, out
        except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - a failing unit never stops the batch
            if is_interrupt(e):
                log.warning("%s unit %s interrupted", stage, target_id)
                raise as_interrupted(e) from None
            if isinstance(e, StoreWriteError):
                raise
            if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:  # a full or read-only disk fails every later unit too
                from reverie.pipeline.store import write_failure

                where = e.filename or (self.store.project_dir / ("reports" if stage == "report" else ""))
                raise write_failure(where, e) from None
            log.exception("%s unit %s failed", stage, target_id)
            self.record(target_id, stage, "failed", started, f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - t0)
            return False, None


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
