"""Import layers (issue 13 §3): application → reports → stages → sae_targets → base, enforced by
import-linter (``[tool.importlinter]`` in pyproject.toml, run through scripts/lint_imports.py), a
contract that can fail, and readers of rows that never import torch."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="import-linter is in the dev extra (bash scripts/setup.sh --dev)")

_spec = importlib.util.spec_from_file_location("lint_imports", REPO / "scripts" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint_imports)


def _layers() -> list[list[str]]:
    (contract,) = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert contract["type"] == "layers"
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def test_import_layers_are_kept():
    r = lint_imports.lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_every_module_has_exactly_one_layer(tmp_path):
    layers = _layers()
    assert [layer for layer in layers if len(layer) == 1] == [["reverie.reports"], ["reverie.stages"], ["reverie.sae_targets"]]
    named = [m for layer in layers for m in layer]
    assert len(named) == len(set(named))
    mods = lint_imports.modules(lint_imports.build_view(REPO, tmp_path))
    assert len(mods) > 50 and "reverie.pipeline.cli" in mods and "reverie.stages.compare.core" in mods
    for m in mods:
        if m in ("reverie", "reverie.pipeline"):       # the library API on top, and an empty package
            continue
        owners = [n for n in named if m == n or m.startswith(n + ".")]
        assert len(owners) == 1, f"{m} is in no layer of [tool.importlinter] (or in several: {owners}); add it to one"


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("reverie", "pipeline", "stages", "sae_targets", "reports"):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contract_fails_on_upward_imports_top_level_and_inside_functions(tmp_path):
    root = _copy_project(tmp_path / "copy")
    clean = lint_imports.lint(root)
    errors = root / "pipeline" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport reverie.pipeline.cli  # noqa: E402  (planted: base → application)\n")
    spec = root / "sae_targets" / "spec.py"
    spec.write_text(spec.read_text() + "\n\ndef _planted():\n    from reverie.stages.compare import run_compare\n\n    return run_compare\n")
    r = lint_imports.lint(root)
    assert r.returncode == 1 and "0 kept, 1 broken" in r.stdout, r.stdout[-4000:]
    assert "reverie.pipeline.errors -> reverie.pipeline.cli" in r.stdout
    assert "reverie.sae_targets.spec -> reverie.stages.compare" in r.stdout   # a lazy import inside a function counts
    assert "reverie.pipeline.errors" not in clean.stdout and "reverie.sae_targets.spec ->" not in clean.stdout


def test_readers_of_rows_import_no_torch(tmp_path):
    code = ("import reverie.reports.render, reverie.reports.data, reverie.reports.atlas, reverie.reports.plots, "
            "reverie.reports.features, reverie.stages.compare, reverie.sae_targets.spec, reverie.pipeline.store; "
            "import sys; assert 'torch' not in sys.modules, 'torch was imported'; "
            "from reverie.stages.compare import Comparison, compare_results; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
