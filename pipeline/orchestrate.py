"""Orchestration: runs, their targets, and (issue 7) the nightly batch over every stage.

The nightly's units and their ledger live in :mod:`pipeline.units`, the extra EPO seeds inside
the wall budget in :mod:`pipeline.allocation`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from reverie.pipeline.allocation import dataset_max, run_extra_seeds
from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import StoreWriteError
from reverie.pipeline.sae_identity import record_sae
from reverie.pipeline.store import Store
from reverie.pipeline.units import RUN_LEVEL, NightlySummary, UnitLedger, now_utc
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.selection import Target

log = logging.getLogger("reverie.nightly")


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
    """Start (or resume) a run and store its targets, replacing any earlier rows of that run
    (``reverie targets --record``, ``reverie dream``, ``reverie scan``; a ``kind='targets'`` run is
    finished 'done' at once). Only call it once the model, SAE and targets are known to be valid:
    nothing is written before.

    Returns:
        The run id.
    """
    run_id = run_id or new_run_id(kind)
    with Store(cfg.project.path) as store:
        store.start_run(run_id, kind, json.dumps(cfg.to_toml_dict(), sort_keys=True), cfg.fingerprint())
        record_sae(store, run_id, subject)
        store.replace("targets", {"run_id": run_id}, target_rows(run_id, subject, targets, density_source))
        if kind == "targets":
            store.finish_run(run_id, "done", summary={"n_targets": len(targets)})
    return run_id


def default_run_id() -> str:
    """'nightly-YYYYmmdd' (UTC date)."""
    return f"nightly-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d')}"


def _check_finite(results: list[Any]) -> None:
    for r in results:
        vals = [p.activation for p in getattr(r, "frontier", [])] + [p.ce for p in getattr(r, "frontier", [])]
        if not vals or any(not math.isfinite(v) for v in vals):
            raise FloatingPointError("the objective or CE is NaN/inf or the frontier is empty; check the objective and the SAE weights")


def _stored_targets(store: Store, run_id: str) -> list[Target]:
    rows = store.fetch("SELECT latents, combine, log10_density FROM targets WHERE run_id = ? ORDER BY len(latents), target_id", [run_id])
    return [Target(latents=list(r["latents"]), combine=r["combine"], log10_density=list(r["log10_density"] or [])) for r in rows]


def _attach_log(path: Path) -> logging.Handler:
    from reverie.pipeline.errors import ReverieError
    from reverie.pipeline.store import write_failure

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
    except (FileExistsError, NotADirectoryError) as e:
        raise ReverieError(f"cannot create the log folder {path.parent}: {e.strerror or e} (a file is in the way). "
                           "Set project.dir (or --project-dir) to a writable folder.") from None
    except OSError as e:
        raise write_failure(path, e, doing="create the log file") from None
    logging.raiseExceptions = False  # a full disk must not print a traceback per log record
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

    The run's record tells the truth: 'done' only when every unit finished; 'failed' (with the
    error, also in the log file) when a unit failed or the model/SAE/targets could not be loaded;
    'interrupted' when SIGINT/SIGTERM stopped it (:mod:`pipeline.signals`; a rerun resumes).
    Its wall time adds up over resumes. A resume lists the units it skipped
    (``summary.skipped_units``) and does not render the report again when its inputs did not
    change (:func:`report_key`).

    Args:
        cfg: the configuration (``targets.seed`` None = today's date).
        run_id: defaults to ``run.run_id`` or 'nightly-YYYYmmdd'.

    Returns:
        :class:`NightlySummary`; ``exit_code`` is 1 if any unit failed.
    Raises:
        ReverieError: the model, SAE or corpus cannot be loaded, or the targets are invalid
            (the run is recorded 'failed'; latent ids are checked against the SAE's cfg.json
            before the model loads); ConfigError: an unsafe run id (nothing is written).
        StoreWriteError: the database cannot be written (disk full, read-only); one message,
            everything committed is kept and a rerun resumes.
        Interrupted: SIGINT or SIGTERM (or KeyboardInterrupt); the run is recorded 'interrupted'.
    """
    from reverie.sae_targets.loading import load_subject, precheck_targets
    from reverie.sae_targets.selection import select_targets

    from reverie.pipeline.paths import check_run_id
    from reverie.pipeline.runtime import apply_torch_threads
    from reverie.pipeline.signals import as_interrupted, check_interrupt, is_interrupt

    t0 = time.time()
    apply_torch_threads(cfg.run)
    run_id = check_run_id(run_id or cfg.run.run_id or default_run_id())
    summary = NightlySummary(run_id=run_id)
    project = cfg.project.path
    summary.log_file = project / "logs" / f"{run_id}.log"
    handler = _attach_log(summary.log_file)
    try:
        store = Store(project)
    except BaseException:
        logging.getLogger().removeHandler(handler)
        handler.close()
        raise
    executor = None
    error: BaseException | None = None
    prior_wall = 0.0
    ledger: UnitLedger | None = None
    done_before: dict[str, list[str]] = {}
    try:
        resumed = not store.start_run(run_id, "nightly", json.dumps(cfg.to_toml_dict(), sort_keys=True), cfg.fingerprint())
        prior_wall = store.run_wall_s(run_id) if resumed else 0.0
        log.info("%s run %s (project %s)", "resuming" if resumed else "starting", run_id, project)
        ledger = UnitLedger(store, run_id, summary)
        done_before = ledger.done_units() if resumed else {}
        check_interrupt()
        if not ledger.is_done(RUN_LEVEL, "targets"):  # bad latent ids fail here, before the model loads
            precheck_targets(cfg.targets.latents, cfg.targets.combinations, cfg.sae, n_random=cfg.targets.n_random)
        subject = load_subject(cfg.model, cfg.sae)
        record_sae(store, run_id, subject)

        # targets ---------------------------------------------------------------
        if ledger.is_done(RUN_LEVEL, "targets"):
            targets = _stored_targets(store, run_id)
            summary.skipped += 1
        else:
            from reverie.pipeline.reuse import explained_latents

            # the random draw prefers latents no earlier night explained (targets.allow_repeats = true: no preference)
            seen = set() if cfg.targets.allow_repeats else explained_latents(store, subject.sae_key, run_id)
            chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus, explained=seen)
            ok, _ = ledger.run(RUN_LEVEL, "targets", lambda: store.replace("targets", {"run_id": run_id}, target_rows(run_id, subject, chosen, source)))
            targets = chosen if ok else []
        log.info("targets: %s", ", ".join(t.target_id for t in targets))
        changed = False

        # scan (shared by every target; reused across nights via its content hash) -------
        from reverie.stages.scan import run_scan

        scan_done_before = ledger.is_done(RUN_LEVEL, "scan")
        if scan_done_before:
            scan_id = run_scan(cfg, subject, store, targets)  # finished scan: returned at once
            summary.skipped += 1
        else:
            ok, scan_id = ledger.run(RUN_LEVEL, "scan", lambda: run_scan(cfg, subject, store, targets), atomic=False)
            changed = True

        # dream (the executor computes batches of targets; this driver alone writes) ----------
        from reverie.stages.dream import write_dream

        todo = [t for t in targets if not ledger.is_done(t.target_id, "dream")]
        summary.skipped += len(targets) - len(todo)
        from reverie.pipeline.reuse import dream_fingerprint, mark_fingerprint, reuse_dreams

        if todo:  # cross-night reuse: a target dreamed before under the same fingerprint gets those rows
            n_todo = len(todo)
            todo = reuse_dreams(cfg, subject, store, ledger, run_id, todo)
            changed = changed or len(todo) < n_todo
        if todo:
            changed = True
            from reverie.pipeline.executors import make_executor

            executor = make_executor(cfg, subject, dataset_max(store, scan_id))
            log.info("dreaming %d targets on the %s executor (batched EPO)", len(todo), executor.name)
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
                    mark_fingerprint(store, run_id, target.target_id, dream_fingerprint(cfg, subject, target))

                # the unit's wall time is its compute: its share of the batched search(es)
                ledger.run(target.target_id, "dream", write, wall_s=sum(r.wall_s for r in results))

        # compare ---------------------------------------------------------------
        from reverie.stages.compare import run_compare

        if scan_id and (changed or not ledger.is_done(RUN_LEVEL, "compare")):
            ok, rows = ledger.run(RUN_LEVEL, "compare", lambda: run_compare(cfg, store, run_id, scan_id))
        # extra seeds inside the wall budget (issue 15 §3), then compare again --------------
        if scan_id and cfg.run.budget_s and cfg.run.max_extra_seeds > 0 and targets:
            if run_extra_seeds(cfg, subject, store, run_id, targets, scan_id, t0):
                ledger.run(RUN_LEVEL, "compare", lambda: run_compare(cfg, store, run_id, scan_id))
        s = store.fetch_one("SELECT frac_beats, frac_beats_in_dist, n_dominates, n_dominance_known FROM compare_summary WHERE run_id = ?", [run_id])
        if s:
            summary.frac_beats, summary.frac_beats_in_dist = s["frac_beats"], s["frac_beats_in_dist"]
            summary.n_dominates, summary.n_dominance_known = s["n_dominates"], s["n_dominance_known"]

        # explain (optional) -------------------------------------------------------
        from reverie.stages.explain import explain_available, run_explain

        available, why = explain_available(cfg)
        if not available:
            log.info("explain: skipped (%s)", why)
            summary.notes.append(f"explain skipped: {why}")
            if not ledger.is_done(RUN_LEVEL, "explain"):
                ledger.record(RUN_LEVEL, "explain", "skipped", now_utc(), why)
        elif scan_id and (changed or not ledger.is_done(RUN_LEVEL, "explain")):
            ledger.run(RUN_LEVEL, "explain", lambda: run_explain(cfg, store, run_id, scan_id), atomic=False)

        # report ----------------------------------------------------------------
        from reverie.reports.render import render_reports

        # the index shows the run's status and wall time: record them before rendering
        check_interrupt()
        prev = store.fetch_one("SELECT report_key, summary_json FROM runs WHERE run_id = ?", [run_id])
        store.finish_run(run_id, "failed" if summary.failed else "done", prior_wall + time.time() - t0,
                         {"done": summary.done, "failed": summary.failed, "skipped": summary.skipped})

        key = report_key(cfg, store, run_id)
        prev_index = _previous_index(prev)
        if (ledger.is_done(RUN_LEVEL, "report") and prev and prev["report_key"] == key
                and prev_index is not None and prev_index.exists()):
            summary.index_html, summary.report_reused = prev_index, True
            log.info("report: inputs unchanged since it was rendered; kept %s", prev_index)
        else:
            ok, index = ledger.run(RUN_LEVEL, "report", lambda: render_reports(cfg, store, run_id), atomic=False)
            summary.index_html = index
            store.set_report_key(run_id, key if ok else None)

        # atlas (issue 15): this night's summary rows, its diff with the night before, the site over all nights
        from reverie.reports.atlas import update_atlas

        from reverie.reports.atlas import atlas_dir

        atlas_index = atlas_dir(cfg) / "index.html"
        if summary.report_reused and ledger.is_done(RUN_LEVEL, "atlas") and atlas_index.exists():
            summary.atlas_html = atlas_index  # nothing of this night changed since the atlas took it in
            summary.skipped += 1
        else:
            ok, atlas_index = ledger.run(RUN_LEVEL, "atlas", lambda: update_atlas(cfg, store, run_id), atomic=False)
            summary.atlas_html = atlas_index if ok else None
    except BaseException as e:
        error = e
        if is_interrupt(e):
            raise as_interrupted(e) from None
        raise
    finally:
        if executor is not None:
            try:
                executor.close()
            except Exception:  # noqa: BLE001 - never hide the run's own outcome
                log.exception("closing the %s executor failed", executor.name)
        summary.wall_s = time.time() - t0
        summary.total_wall_s = prior_wall + summary.wall_s
        if ledger is not None:
            summary.skipped_units = {st: [t for t in ids if (t, st) not in ledger.ran] for st, ids in done_before.items()}
            summary.skipped_units = {st: ids for st, ids in summary.skipped_units.items() if ids}
        interrupted = error is not None and is_interrupt(error)
        status = "interrupted" if interrupted else "failed" if (error is not None or summary.failed) else "done"
        err_text = None
        if error is not None:
            err_text = str(as_interrupted(error)) if interrupted else f"{type(error).__name__}: {error}"
            if interrupted:
                log.warning("run %s %s; rerun the same run id to resume", run_id, err_text)
            elif isinstance(error, StoreWriteError):
                log.error("run %s stopped: %s", run_id, err_text)
            else:
                log.error("run %s failed: %s", run_id, err_text, exc_info=(type(error), error, error.__traceback__))
        try:
            store.finish_run(run_id, status, summary.total_wall_s, {
                "done": summary.done, "failed": summary.failed, "skipped": summary.skipped,
                "index_html": str(summary.index_html) if summary.index_html else None,
                "frac_beats": summary.frac_beats, "frac_beats_in_dist": summary.frac_beats_in_dist,
                "n_dominates": summary.n_dominates, "n_dominance_known": summary.n_dominance_known,
                "failures": summary.failures, "session_wall_s": summary.wall_s,
            }, error=err_text)
        except Exception as e:  # noqa: BLE001 - the original error (if any) matters more
            if isinstance(error, StoreWriteError) or isinstance(e, StoreWriteError):
                log.warning("could not record run %s as %s: %s", run_id, status, e)  # one line: the cause is already reported
            else:
                log.exception("could not record run %s as %s", run_id, status)
        finally:
            store.close()
            log.info("run %s %s: %d done, %d failed, %d skipped in %.1f s (%.1f s over all sessions)", run_id, status,
                     summary.done, summary.failed, summary.skipped, summary.wall_s, summary.total_wall_s)
            logging.getLogger().removeHandler(handler)
            handler.close()
    return summary


def report_key(cfg: ReverieConfig, store: Store, run_id: str) -> str:
    """Key of a run's report inputs: every non-report unit of the run (target, stage, status,
    end time of units that wrote rows), the run's status, the configuration and the code
    version. Equal keys mean the report would be rendered from the same rows by the same code
    (only the run's wall time on the index may be older), so a resume keeps the existing report.

    Returns:
        'sha256:' + 16 hex characters.
    """
    from reverie.pipeline.hashing import content_key
    from reverie.pipeline.store import code_version

    # a 'skipped' unit (explain without an API key) is re-recorded each session without new rows: its time does not count
    units = store.fetch("SELECT target_id, stage, status, CASE WHEN status = 'skipped' THEN NULL ELSE CAST(ended_at AS VARCHAR) END AS ended "
                        "FROM units WHERE run_id = ? AND stage NOT IN ('report', 'atlas') ORDER BY stage, target_id", [run_id])
    run = store.fetch_one("SELECT status FROM runs WHERE run_id = ?", [run_id])
    return "sha256:" + content_key({"units": units, "status": run["status"] if run else None, "config": cfg.fingerprint(),
                                    "code": code_version()}, default=str)


def _previous_index(row: dict | None) -> Path | None:
    try:
        path = json.loads(row["summary_json"] or "{}").get("index_html") if row else None
    except (TypeError, ValueError):
        return None
    return Path(path) if path else None
