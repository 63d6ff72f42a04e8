"""Run records that tell the truth (issue 11 item 5, issue 16 item 4): failed loads and invalid
targets are 'failed', SIGINT/SIGTERM give 'interrupted' + 130/143 and a rerun resumes, a dry
`reverie targets` writes nothing, a too-short corpus is a clear error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reverie.pipeline.cli import app
from reverie.pipeline.store import Store
from tests.conftest import DEMO_CONFIG, REPO

runner = CliRunner()

# the smallest real nightly: one random latent, a short scan and a short EPO
TINY = {
    "targets.n_random": 1, "targets.seed": 5, "targets.combinations": [],
    "dream.iterations": 6, "dream.population": 4, "dream.children": 8, "dream.topk": 64,
    "dream.restart_every": 3, "dream.seeds": [0], "dream.attribution_prompts": 1, "dream.attribution_topk": 8,
    "scan.max_tokens": 4000, "scan.batch_size": 8, "scan.top_k": 8, "scan.checkpoint_every": 2,
    "scan.window_ce_samples": 64, "scan.baseline_prompts": 64, "explain.enabled": False,
}


def _set_flags(d: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in d.items()]


def _run_row(project: Path, run_id: str) -> dict:
    with Store(project, read_only=True) as s:
        return s.fetch_one("SELECT * FROM runs WHERE run_id = ?", [run_id])


@pytest.fixture(autouse=True)
def _clean_signal_flag():
    from reverie.pipeline import signals

    signals.clear()
    yield
    signals.clear()


# ----------------------------------------------------------------------------- unit ledger


def test_ledger_never_records_an_interruption_as_a_failure(tmp_path):
    from reverie.pipeline import signals
    from reverie.pipeline.errors import Interrupted
    from reverie.pipeline.orchestrate import NightlySummary, UnitLedger

    with Store(tmp_path) as store:
        store.start_run("r", "nightly", "{}", "h")
        ledger = UnitLedger(store, "r", NightlySummary(run_id="r"))

        def ctrl_c():
            raise KeyboardInterrupt

        with pytest.raises(Interrupted) as e:
            ledger.run("1", "dream", ctrl_c)
        assert e.value.exit_code == 130

        def sigterm_mid_query():  # DuckDB turns a signal during a query into this RuntimeError
            signals.request_stop(signal.SIGTERM)
            raise RuntimeError("Query interrupted")

        with pytest.raises(Interrupted) as e:
            ledger.run("2", "dream", sigterm_mid_query, atomic=False)
        assert e.value.exit_code == 143
        with pytest.raises(Interrupted):  # a pending signal stops the next unit before it starts
            ledger.run("3", "dream", lambda: None)
        assert store.fetch("SELECT * FROM units") == []

        signals.clear()

        def compute():
            time.sleep(0.3)
            return 7

        assert ledger.run("4", "dream", compute) == (True, 7)
        assert ledger.run("5", "dream", lambda: 1 / 0) == (False, None)
        units = {r["target_id"]: r for r in store.fetch("SELECT * FROM units")}
        assert units["4"]["status"] == "done" and 0.3 <= units["4"]["wall_s"] < 1.0
        assert units["5"]["status"] == "failed" and "ZeroDivisionError" in units["5"]["error"]


def test_check_interrupt_and_exit_codes():
    from reverie.pipeline import signals
    from reverie.pipeline.errors import Interrupted

    signals.check_interrupt()  # nothing pending: returns
    signals.request_stop(signal.SIGINT)  # first signal: only the flag
    with pytest.raises(Interrupted) as e:
        signals.check_interrupt()
    assert e.value.exit_code == 130 and "SIGINT" in str(e.value)
    with pytest.raises(Interrupted):  # a second signal stops at once
        signals.request_stop(signal.SIGTERM)
    signals.clear()
    with pytest.raises(Interrupted) as e:  # inside interruptible() the first signal stops at once
        with signals.interruptible():
            signals.request_stop(signal.SIGTERM)
    assert e.value.exit_code == 143


# ----------------------------------------------------------------------------- failed runs


def test_failed_load_is_recorded_failed(tmp_path):
    project = tmp_path / "p"
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run-id", "bad",
                            "--set", f"model.path={tmp_path / 'no-such-model'}"])
    assert r.exit_code == 2 and "model directory not found" in r.output and "Traceback" not in r.output
    row = _run_row(project, "bad")
    assert row["status"] == "failed" and "model directory not found" in row["error"]
    assert "model directory not found" in (project / "logs" / "bad.log").read_text()


def test_invalid_targets_are_recorded_failed(tmp_path):
    project = tmp_path / "p"
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run-id", "bad",
                            "--set", "targets.latents=[99999]"])
    assert r.exit_code == 2 and "do not exist" in r.output
    row = _run_row(project, "bad")
    assert row["status"] == "failed" and "TargetError" in row["error"] and row["wall_s"] > 0


def test_too_short_corpus_is_a_clear_error(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "Tom ran."}) + "\n")
    project = tmp_path / "p"
    r = runner.invoke(app, ["scan", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--set", f"scan.corpus.path={corpus}",
                            "--set", "targets.n_random=1", "--set", "scan.baseline_prompts=16", "--set", "scan.window_ce_samples=8"])
    assert r.exit_code == 2, r.output
    assert "corpus is too short" in r.output and "dream.n_tokens = 12" in r.output and "Traceback" not in r.output
    with Store(project, read_only=True) as s:
        row = s.fetch_one("SELECT status, error FROM runs WHERE kind = 'scan'")
    assert row["status"] == "failed" and "too short" in row["error"]


def test_targets_is_a_dry_run_unless_record(tmp_path):
    args = ["targets", "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path / "p"), "--n-random", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "not recorded" in r.output, r.output
    assert not (tmp_path / "p").exists()  # not even the project folder
    assert runner.invoke(app, [*args, "--record"]).exit_code == 0
    db = tmp_path / "p" / "reverie.duckdb"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    assert runner.invoke(app, args).exit_code == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    with Store(tmp_path / "p", read_only=True) as s:
        assert s.fetch_one("SELECT count(*) AS n FROM runs")["n"] == 1


# ----------------------------------------------------------------------------- signals, end to end


def _launch(project: Path, run_id: str) -> subprocess.Popen:
    cmd = [str(REPO / ".venv" / "bin" / "reverie"), "nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project),
           "--run-id", run_id, *_set_flags(TINY)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)


def _signal_when(proc: subprocess.Popen, log: Path, marker: str, signum: int, timeout: float = 240) -> str:
    """Send ``signum`` once ``marker`` is in the log; return the process output."""
    t = time.time()
    while time.time() - t < timeout:
        if log.exists() and marker in log.read_text():
            proc.send_signal(signum)
            return proc.communicate(timeout=120)[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {marker!r}: {proc.communicate()[0][-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"marker {marker!r} never appeared")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_interrupts_then_a_rerun_resumes(signum, code, tmp_path):
    project, run_id = tmp_path / "p", "nightly-sig"
    log = project / "logs" / f"{run_id}.log"
    proc = _launch(project, run_id)
    out = _signal_when(proc, log, "unit scan *: done", signum)
    name = signal.Signals(signum).name
    assert proc.returncode == code, out[-2000:]
    assert f"interrupted by {name}" in out and "Traceback" not in out
    row = _run_row(project, run_id)
    assert row["status"] == "interrupted" and name in row["error"] and row["wall_s"] > 0
    first_wall = row["wall_s"]
    assert "interrupted" in log.read_text()
    with Store(project, read_only=True) as s:
        assert not s.fetch("SELECT * FROM units WHERE status = 'failed'")

    if signum == signal.SIGINT:  # the CLI resumes it ...
        proc = _launch(project, run_id)
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-2000:]
        assert "skipped targets: already done" in out and "skipped scan: already done" in out
    else:  # ... and so does the library call, which then keeps the unchanged report
        from reverie.pipeline.config import load_config
        from reverie.pipeline.orchestrate import run_nightly

        cfg = load_config(DEMO_CONFIG, {**TINY, "project.dir": str(project)})
        s = run_nightly(cfg, run_id)
        assert s.exit_code == 0 and not s.report_reused
        again = run_nightly(cfg, run_id)
        assert again.report_reused and again.done == 0 and again.index_html == s.index_html
        assert set(again.skipped_units) >= {"targets", "scan", "dream", "compare", "report"}
        # `reverie report` without --run renders the latest run that has dreams, not a newer run without any
        args = ["--config", str(DEMO_CONFIG), "--project-dir", str(project)]
        assert runner.invoke(app, ["targets", *args, "--n-random", "1", "--record"]).exit_code == 0
        r = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "rep")])
        assert r.exit_code == 0, r.output
        assert run_id in (tmp_path / "rep" / "index.html").read_text()
    row = _run_row(project, run_id)
    assert row["status"] == "done" and row["error"] is None
    assert row["wall_s"] > first_wall  # wall time adds up over sessions
    with Store(project, read_only=True) as s:
        units = {(u["target_id"], u["stage"]): u["status"] for u in s.fetch("SELECT * FROM units WHERE run_id = ?", [run_id])}
    assert sum(1 for (t, st), v in units.items() if st == "dream" and v == "done") == 1
    assert units[("*", "report")] == "done"
