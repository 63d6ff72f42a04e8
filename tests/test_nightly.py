"""The nightly batch: end to end on the demo, idempotent reruns, kill-and-resume, Ray executor."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reverie.pipeline.config import load_config
from reverie.pipeline.store import Store
from tests.conftest import DEMO_CONFIG, REPO

# small but real: 2 random latents + one 2-latent combination, a short EPO, a short scan
TINY = {
    "targets.n_random": 2, "targets.seed": 5, "targets.combinations": [[35, 85]],
    "dream.iterations": 6, "dream.population": 4, "dream.children": 8, "dream.topk": 64,
    "dream.restart_every": 3, "dream.seeds": [0], "dream.attribution_prompts": 1, "dream.attribution_topk": 8,
    "scan.max_tokens": 4000, "scan.batch_size": 8, "scan.top_k": 8, "scan.checkpoint_every": 2,
    "scan.window_ce_samples": 64, "scan.baseline_prompts": 64, "explain.enabled": False,
}
SETS = [f"--set={k}={v!r}".replace("'", '"') if isinstance(v, str) else f"--set={k}={v}".replace("True", "true").replace("False", "false") for k, v in TINY.items()]

VOLATILE = {"batch_jobs", "wall_s", "created_at", "updated_at", "started_at", "ended_at", "applied_at", "latency_s", "config_json", "summary_json", "code_version", "timing_json", "pass_wall_s"}
TABLES = ["targets", "dream_runs", "dream_prompts", "dream_history", "dream_attributions", "scans", "scan_latents",
          "scan_examples", "baselines", "comparisons", "compare_summary", "units"]


def snapshot(project: Path) -> dict[str, list[dict]]:
    """Every table's rows, volatile columns dropped, in a canonical order — for equality across runs."""
    out = {}
    with Store(project, read_only=True) as s:
        for t in TABLES:
            rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in s.fetch(f'SELECT * FROM "{t}"')]
            out[t] = sorted(rows, key=lambda r: repr(sorted((k, _rounded(v)) for k, v in r.items())))
    return out


def _rounded(v):
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def _same(a, b, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    return a == b


def assert_tables_equal(got: dict, want: dict, what: str, rel: float = 0.0, skip: tuple = ("units",)) -> None:
    """Equal rows table by table; floats equal within ``rel`` (0 = exactly)."""
    for t in TABLES:
        if t in skip:
            continue
        assert len(got[t]) == len(want[t]), f"table {t}: {len(got[t])} rows vs {len(want[t])} ({what})"
        for g, w in zip(got[t], want[t]):
            assert g.keys() == w.keys()
            bad = [k for k in g if not _same(g[k], w[k], rel)]
            assert not bad, f"table {t} differs in {bad} ({what}): {[(g[k], w[k]) for k in bad][:2]}"


def _cfg(project: Path, **extra):
    return load_config(DEMO_CONFIG, {**TINY, "project.dir": str(project), **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted nightly on the demo (local executor)."""
    from reverie.pipeline.orchestrate import run_nightly

    project = tmp_path_factory.mktemp("ref")
    summary = run_nightly(_cfg(project), run_id="nightly-test")
    return project, summary


def test_nightly_end_to_end(reference):
    project, s = reference
    assert s.exit_code == 0, s.failures
    assert s.index_html and s.index_html.exists()
    assert s.log_file.exists() and "unit dream" in s.log_file.read_text()
    with Store(project, read_only=True) as st:
        units = st.fetch("SELECT target_id, stage, status FROM units WHERE run_id = 'nightly-test'")
        targets = [r["target_id"] for r in st.fetch("SELECT target_id FROM targets")]
        assert len(targets) == 3 and "35+85" in targets
        assert {(u["target_id"], u["status"]) for u in units if u["stage"] == "dream"} == {(t, "done") for t in targets}
        assert {u["stage"] for u in units} == {"targets", "scan", "dream", "compare", "explain", "report", "atlas"}
        assert st.fetch_one("SELECT status FROM runs WHERE run_id = 'nightly-test'")["status"] == "done"
        assert st.fetch_one("SELECT count(*) AS n FROM comparisons WHERE run_id = 'nightly-test'")["n"] == 3
    pages = list(s.index_html.parent.glob("*.html"))
    assert len(pages) >= 4  # index + 3 targets


def test_rerun_skips_finished_units(reference, tmp_path):
    from reverie.pipeline.orchestrate import run_nightly

    project, _ = reference
    before = snapshot(project)
    s = run_nightly(_cfg(project), run_id="nightly-test")
    assert s.exit_code == 0
    assert s.done <= 3  # only run-level compare/report may redo; no dream or scan unit reran
    assert_tables_equal(snapshot(project), before, "rerun vs first run")


def _launch(project: Path, run_id: str) -> subprocess.Popen:
    cmd = [str(REPO / ".venv" / "bin" / "reverie"), "nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run-id", run_id, *SETS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def _kill_when(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 240) -> bool:
    """SIGKILL the run as soon as ``marker`` appears in its log. False if it finished first."""
    t = time.time()
    start = log.stat().st_size if log.exists() else 0  # only this launch's lines count
    while time.time() - t < timeout:
        if log.exists() and marker in log.read_text()[start:]:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"marker {marker!r} never appeared")


@pytest.mark.slow
def test_kill_at_several_points_then_resume_equals_uninterrupted(reference, tmp_path):
    ref_project, _ = reference
    project = tmp_path / "killed"
    log = project / "logs" / "nightly-test.log"
    # kill points: right after the targets unit, mid-scan (after a checkpoint), after the first dream unit
    for marker in ("unit targets *: done", "checkpoint", "unit dream"):
        assert _kill_when(_launch(project, "nightly-test"), log, marker), f"the run finished before {marker!r}"
    proc = _launch(project, "nightly-test")
    assert proc.wait(timeout=600) == 0
    got, want = snapshot(project), snapshot(ref_project)
    # same prompts and frontiers; floats agree to float32 rounding: a resumed run dreams the
    # remaining targets in a smaller batch, and a matrix product over fewer rows may round its last bit differently
    assert_tables_equal(got, want, "kill-and-resume vs uninterrupted", rel=1e-5)
    unit = lambda rows: {(r["target_id"], r["stage"], r["status"]) for r in rows}  # noqa: E731
    assert unit(got["units"]) == unit(want["units"])


@pytest.mark.ray
def test_ray_executor_gives_the_same_rows(reference, tmp_path):
    pytest.importorskip("ray")
    from reverie.pipeline.orchestrate import run_nightly

    ref_project, _ = reference
    project = tmp_path / "ray"
    s = run_nightly(_cfg(project, **{"run.executor": "ray", "run.ray_num_workers": 2}), run_id="nightly-test")
    assert s.exit_code == 0, s.failures
    # same prompts and frontiers; floats agree to float32 rounding (workers run with other thread counts)
    assert_tables_equal(snapshot(project), snapshot(ref_project), "Ray vs local executor", rel=1e-5)


def test_a_failing_unit_does_not_stop_the_others(tmp_path, monkeypatch):
    """A target whose dream raises is recorded as failed; the rest finish; exit code 1."""
    import reverie.stages.dream.stage as stage
    from reverie.pipeline.orchestrate import run_nightly

    real = stage.run_epo_batch

    def flaky(subject, jobs, cfg, *a, **k):
        if any(j.objective.combine for j in jobs):
            raise FloatingPointError("objective returned NaN")
        return real(subject, jobs, cfg, *a, **k)

    monkeypatch.setattr(stage, "run_epo_batch", flaky)
    s = run_nightly(_cfg(tmp_path / "p"), run_id="nightly-fail")
    assert s.exit_code == 1 and s.failed == 1
    assert any("35+85" in f and "NaN" in f for f in s.failures)
    with Store(tmp_path / "p", read_only=True) as st:
        st_units = {(r["target_id"], r["stage"]): r["status"] for r in st.fetch("SELECT * FROM units")}
    assert st_units[("35+85", "dream")] == "failed"
    assert sum(1 for (t, stage), v in st_units.items() if stage == "dream" and v == "done") == 2
    assert st_units[("*", "report")] == "done"
