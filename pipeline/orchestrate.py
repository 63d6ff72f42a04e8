"""Orchestration: runs, their targets, and (issue 7) the nightly batch over every stage."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from pipeline.config import ReverieConfig
from pipeline.store import Store
from sae_targets.loading import Subject
from sae_targets.selection import Target


def new_run_id(kind: str) -> str:
    """'<kind>-YYYYmmdd-HHMMSS-xxxx' (UTC time + 4 random hex digits, so two runs never collide)."""
    return f"{kind}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def target_rows(run_id: str, subject: Subject, targets: list[Target], density_source: str) -> list[dict]:
    """Rows of the ``targets`` table for a run."""
    return [
        {
            "run_id": run_id, "target_id": t.target_id, "model_key": subject.model_key, "sae_key": subject.sae_key,
            "hook_name": subject.hook_name, "latents": list(t.latents), "combine": t.combine,
            "log10_density": [float(d) if d is not None else None for d in t.log10_density], "density_source": density_source,
        }
        for t in targets
    ]


def record_targets(cfg: ReverieConfig, subject: Subject, targets: list[Target], density_source: str,
                   run_id: str | None = None, kind: str = "targets") -> str:
    """Start (or resume) a run and store its targets, replacing any earlier rows of that run.

    Returns:
        The run id.
    """
    run_id = run_id or new_run_id(kind)
    with Store(cfg.project.path) as store:
        store.start_run(run_id, kind, json.dumps(cfg.to_toml_dict(), sort_keys=True), cfg.fingerprint())
        store.replace("targets", {"run_id": run_id}, target_rows(run_id, subject, targets, density_source))
        if kind == "targets":
            store.finish_run(run_id, "done", summary={"n_targets": len(targets)})
    return run_id


# --------------------------------------------------------------------------- nightly batch

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("reverie.nightly")

STAGES = ("targets", "scan", "dream", "compare", "explain", "report")
RUN_LEVEL = "*"  # target_id of units that cover the whole run


@dataclass
class NightlySummary:
    """What a nightly run did. ``exit_code`` is 1 when any unit failed."""

    run_id: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    index_html: Path | None = None
    log_file: Path | None = None
    frac_beats: float | None = None
    frac_beats_in_dist: float | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def default_run_id() -> str:
    """'nightly-YYYYmmdd' (UTC date)."""
    return f"nightly-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d')}"


class UnitLedger:
    """Reads and writes the ``units`` table of one run (through the store)."""

    def __init__(self, store: Store, run_id: str, summary: NightlySummary):
        self.store, self.run_id, self.summary = store, run_id, summary

    def status(self, target_id: str, stage: str) -> str | None:
        row = self.store.fetch_one("SELECT status FROM units WHERE run_id = ? AND target_id = ? AND stage = ?", [self.run_id, target_id, stage])
        return row["status"] if row else None

    def is_done(self, target_id: str, stage: str) -> bool:
        return self.status(target_id, stage) == "done"

    def record(self, target_id: str, stage: str, status: str, started: dt.datetime, error: str | None = None) -> None:
        """Write one unit's row (joins the caller's transaction, if any)."""
        ended = now_utc()
        self.store.replace("units", {"run_id": self.run_id, "target_id": target_id, "stage": stage}, [{
            "run_id": self.run_id, "target_id": target_id, "stage": stage, "status": status,
            "started_at": started, "ended_at": ended, "wall_s": (ended - started).total_seconds(), "error": error,
        }])
        log.info("unit %s %s: %s%s", stage, target_id, status, f" ({error})" if error else "")
        if status == "done":
            self.summary.done += 1
        elif status == "failed":
            self.summary.failed += 1
            self.summary.failures.append(f"{stage} {target_id}: {error}")
        else:
            self.summary.skipped += 1

    def run(self, target_id: str, stage: str, fn: Callable[[], Any], atomic: bool = True) -> tuple[bool, Any]:
        """Run ``fn`` as one unit. ``atomic``: its writes and the unit row commit together, or
        neither does. Stages that commit their own progress (the scan's checkpoints, the LLM
        response cache) run with ``atomic=False`` so a kill keeps that progress."""
        started = now_utc()
        try:
            if atomic:
                with self.store.transaction():
                    out = fn()
                    self.record(target_id, stage, "done", started)
            else:
                out = fn()
                self.record(target_id, stage, "done", started)
            return True, out
        except Exception as e:  # noqa: BLE001 - a failing unit never stops the batch
            log.exception("%s unit %s failed", stage, target_id)
            self.record(target_id, stage, "failed", started, f"{type(e).__name__}: {e}")
            return False, None


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _check_finite(results: list[Any]) -> None:
    for r in results:
        vals = [p.activation for p in getattr(r, "frontier", [])] + [p.ce for p in getattr(r, "frontier", [])]
        if not vals or any(not math.isfinite(v) for v in vals):
            raise FloatingPointError("the objective or CE is NaN/inf or the frontier is empty; check the objective and the SAE weights")


def _stored_targets(store: Store, run_id: str) -> list[Target]:
    rows = store.fetch("SELECT latents, combine, log10_density FROM targets WHERE run_id = ? ORDER BY len(latents), target_id", [run_id])
    return [Target(latents=list(r["latents"]), combine=r["combine"], log10_density=list(r["log10_density"] or [])) for r in rows]


def _attach_log(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


def run_nightly(cfg: ReverieConfig, run_id: str | None = None) -> NightlySummary:
    """Run every stage over the configured targets: targets → scan → dream → compare → explain → report.

    Idempotent and resumable: units already 'done' for this run id are skipped; each unit's
    rows commit in one transaction with its ``units`` row, so a kill loses at most the units
    in flight and never leaves partial rows. One failing unit does not stop the others.

    Args:
        cfg: the configuration (``targets.seed`` None = today's date).
        run_id: defaults to ``run.run_id`` or 'nightly-YYYYmmdd'.

    Returns:
        :class:`NightlySummary`; ``exit_code`` is 1 if any unit failed.
    Raises:
        ReverieError: the model, SAE or corpus cannot be loaded (nothing to run).
    """
    from sae_targets.loading import load_subject
    from sae_targets.selection import select_targets

    t0 = time.time()
    if cfg.run.torch_threads:
        import torch

        torch.set_num_threads(cfg.run.torch_threads)
    run_id = run_id or cfg.run.run_id or default_run_id()
    summary = NightlySummary(run_id=run_id)
    project = cfg.project.path
    summary.log_file = project / "logs" / f"{run_id}.log"
    handler = _attach_log(summary.log_file)
    store = Store(project)
    executor = None
    try:
        resumed = not store.start_run(run_id, "nightly", json.dumps(cfg.to_toml_dict(), sort_keys=True), cfg.fingerprint())
        log.info("%s run %s (project %s)", "resuming" if resumed else "starting", run_id, project)
        ledger = UnitLedger(store, run_id, summary)
        subject = load_subject(cfg.model, cfg.sae)

        # targets ---------------------------------------------------------------
        if ledger.is_done(RUN_LEVEL, "targets"):
            targets = _stored_targets(store, run_id)
            summary.skipped += 1
        else:
            chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
            ok, _ = ledger.run(RUN_LEVEL, "targets", lambda: store.replace("targets", {"run_id": run_id}, target_rows(run_id, subject, chosen, source)))
            targets = chosen if ok else []
        log.info("targets: %s", ", ".join(t.target_id for t in targets))
        changed = False

        # scan (shared by every target; reused across nights via its content hash) -------
        from stages.scan import run_scan

        scan_done_before = ledger.is_done(RUN_LEVEL, "scan")
        if scan_done_before:
            scan_id = run_scan(cfg, subject, store, targets)  # finished scan: returned at once
            summary.skipped += 1
        else:
            ok, scan_id = ledger.run(RUN_LEVEL, "scan", lambda: run_scan(cfg, subject, store, targets), atomic=False)
            changed = True

        # dream (the executor computes; this driver alone writes) ----------------------
        from stages.dream import write_dream

        todo = [t for t in targets if not ledger.is_done(t.target_id, "dream")]
        summary.skipped += len(targets) - len(todo)
        if todo:
            changed = True
            from pipeline.executors import make_executor

            executor = make_executor(cfg, subject)
            log.info("dreaming %d targets on the %s executor", len(todo), executor.name)
            from tqdm import tqdm

            units = tqdm(executor.map_dreams(todo), total=len(todo), desc="dream units", unit="target")
            for target, results in units:
                units.set_postfix_str(f"last {target.target_id}")
                started = now_utc()
                if isinstance(results, Exception):
                    ledger.record(target.target_id, "dream", "failed", started, f"{type(results).__name__}: {results}")
                    continue

                def write(target=target, results=results):
                    _check_finite(results)
                    for r in results:
                        write_dream(store, run_id, target, r)

                ledger.run(target.target_id, "dream", write)

        # compare ---------------------------------------------------------------
        if scan_id and (changed or not ledger.is_done(RUN_LEVEL, "compare")):
            from stages.compare import run_compare

            ok, rows = ledger.run(RUN_LEVEL, "compare", lambda: run_compare(cfg, store, run_id, scan_id))
        s = store.fetch_one("SELECT frac_beats, frac_beats_in_dist FROM compare_summary WHERE run_id = ?", [run_id])
        if s:
            summary.frac_beats, summary.frac_beats_in_dist = s["frac_beats"], s["frac_beats_in_dist"]

        # explain (optional) -------------------------------------------------------
        from stages.explain import explain_available, run_explain

        available, why = explain_available(cfg)
        if not available:
            log.info("explain: skipped (%s)", why)
            summary.notes.append(f"explain skipped: {why}")
            if not ledger.is_done(RUN_LEVEL, "explain"):
                ledger.record(RUN_LEVEL, "explain", "skipped", now_utc(), why)
        elif scan_id and (changed or not ledger.is_done(RUN_LEVEL, "explain")):
            ledger.run(RUN_LEVEL, "explain", lambda: run_explain(cfg, store, run_id, scan_id), atomic=False)

        # report ----------------------------------------------------------------
        from reports.render import render_reports

        # the index shows the run's status and wall time: record them before rendering
        store.finish_run(run_id, "failed" if summary.failed else "done", time.time() - t0,
                         {"done": summary.done, "failed": summary.failed, "skipped": summary.skipped})

        ok, index = ledger.run(RUN_LEVEL, "report", lambda: render_reports(cfg, store, run_id), atomic=False)
        summary.index_html = index
    finally:
        if executor is not None:
            executor.close()
        summary.wall_s = time.time() - t0
        status = "failed" if summary.failed else "done"
        try:
            store.finish_run(run_id, status, summary.wall_s, {
                "done": summary.done, "failed": summary.failed, "skipped": summary.skipped,
                "index_html": str(summary.index_html) if summary.index_html else None,
                "frac_beats": summary.frac_beats, "frac_beats_in_dist": summary.frac_beats_in_dist,
                "failures": summary.failures,
            })
        finally:
            store.close()
            logging.getLogger().removeHandler(handler)
            handler.close()
    log.info("run %s: %d done, %d failed, %d skipped in %.1f s", run_id, summary.done, summary.failed, summary.skipped, summary.wall_s)
    return summary
