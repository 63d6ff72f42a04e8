"""Check reverie's import layers with import-linter (the contract is ``[tool.importlinter]`` in pyproject.toml).

    .venv/bin/python scripts/lint_imports.py [--root REPO] [--list]

import-linter's graph builder (grimp) finds a package's modules by walking its folder, but
``reverie.pipeline`` and the other subpackages live in top-level folders (setuptools
``package-dir`` mapping), not under ``reverie/``. So this script builds a view of the import
tree in a temporary folder — ``reverie/__init__.py`` and one symbolic link per mapped
subpackage, read from ``[tool.setuptools.package-dir]`` — and runs ``lint-imports`` on it in a
fresh interpreter whose path finds that view first. Exit code: lint-imports's (0 = kept).

``--list`` prints the modules of the view instead, one per line (what the layer test checks
the contract against).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_view(root: Path, dest: Path) -> Path:
    """Lay out ``dest/reverie`` as the import tree of the project at ``root``.

    Args:
        root: a project folder with pyproject.toml (the repository, or a copy of it).
        dest: an empty folder.
    Returns:
        ``dest`` (put it first on PYTHONPATH).
    Raises:
        KeyError: pyproject.toml has no ``[tool.setuptools.package-dir]`` entry for ``reverie``.
    """
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = dest / "reverie"
    top.mkdir(parents=True)
    for f in (root / mapping["reverie"]).glob("*.py"):
        os.symlink(f.resolve(), top / f.name)
    for name, folder in mapping.items():
        if name != "reverie":
            os.symlink((root / folder).resolve(), top / name.split(".", 1)[1], target_is_directory=True)
    return dest


def modules(view: Path) -> list[str]:
    """Every module of the view (dotted names), sorted."""
    out = []
    for dirpath, _, files in os.walk(view / "reverie", followlinks=True):
        rel = Path(dirpath).relative_to(view)
        if "__pycache__" in rel.parts:
            continue
        for f in files:
            if f.endswith(".py"):
                parts = rel.parts if f == "__init__.py" else (*rel.parts, f[:-3])
                out.append(".".join(parts))
    return sorted(out)


def lint(root: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` (no cache) on the project at ``root``; returns the finished process (text output)."""
    exe = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="reverie-imports-") as tmp:
        view = build_view(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(view)}
        return subprocess.run([str(exe), str(root / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=view, env=env,
                              capture_output=True, text=True, timeout=600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO, help="project folder (default: this repository)")
    ap.add_argument("--list", action="store_true", help="print the modules of the import tree and exit")
    a = ap.parse_args()
    if a.list:
        with tempfile.TemporaryDirectory(prefix="reverie-imports-") as tmp:
            print("\n".join(modules(build_view(a.root, Path(tmp)))))
        return 0
    r = lint(a.root)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
