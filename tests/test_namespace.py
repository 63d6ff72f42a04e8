"""One namespace (`reverie.*`) that a user's own `reports/` or `pipeline/` folder cannot shadow,
the wheel's contents, and the README's notebook example (issue 13)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shadowing_dir(tmp_path: Path) -> Path:
    """A working directory with its own `reports/` and `pipeline/` packages (as research repos have)."""
    for name in ("reports", "pipeline", "stages", "sae_targets"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user folder {name}/ was imported')\n")
    return tmp_path


def test_cli_and_renderer_from_a_directory_with_its_own_packages(tmp_path):
    cwd = _shadowing_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": ""}
    code = "from reverie.reports.render import make_env; make_env(); import reverie.pipeline.store, reverie.stages.compare; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    cli = Path(sys.executable).parent / "reverie"
    r = subprocess.run([str(cli), "config", "show", "--config", str(REPO / "configs" / "demo.toml")], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "[dream]" in r.stdout, r.stderr


@pytest.mark.slow
def test_wheel_holds_the_namespace_and_its_data(tmp_path):
    src = tmp_path / "src"          # build from a copy: setuptools writes build/ beside the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".ci"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("reverie-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for want in ("reverie/__init__.py", "reverie/pipeline/cli.py", "reverie/pipeline/migrations/0001_foundation.sql",
                 "reverie/stages/dream/epo.py", "reverie/sae_targets/loading.py", "reverie/reports/templates/latent.html",
                 "reverie/reports/templates/report.css"):
        assert want in names, want
    tops = {n.split("/")[0] for n in names if not n.startswith("reverie-")}
    assert tops == {"reverie"}, tops                    # no top-level pipeline/, stages/, reports/, tests/


@pytest.mark.slow
def test_readme_notebook_example_runs(tmp_path, shared):
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- notebook example: executed by tests/test_namespace.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its notebook example"
    cwd = _shadowing_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": "", "REVERIE_SHARED": str(shared), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", m.group(1)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("CE ")]
    assert len(rows) == 3 and (cwd / "frontier.png").stat().st_size > 1000
    lines = r.stdout.splitlines()
    assert any(ln.startswith("top example: ") and len(ln) > 30 for ln in lines)          # the scan found text
    table = next(i for i, ln in enumerate(lines) if "dominates" in ln and "data best" in ln)
    assert lines[table + 2].split()[0] == "1039"                                         # the comparison's row
    (verdict,) = [ln for ln in lines if ln.startswith("verdict: ")]
    assert verdict.split(": ", 1)[1] in ("a dream dominates the dataset's best window", "no dream dominates the dataset's best window",
                                         "no dream is as fluent as the dataset's best window")
