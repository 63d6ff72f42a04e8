"""reverie export: every table of a project's database as Parquet / JSON-lines files (DuckDB COPY)."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest
from typer.testing import CliRunner

from reverie.pipeline.cli import app
from reverie.pipeline.store import Store

runner = CliRunner()
ODD = 'odd "name" it\'s'  # a table name that needs quoting, as identifier and as file name


@pytest.fixture()
def project(tmp_path):
    """A small project: the schema's tables, two runs, and one table with an awkward name."""
    p = tmp_path / "project"
    with Store(p) as s:
        s.fetch("SELECT 1")
        s.start_run("r1", "targets", "{}", "0" * 16)
        s.finish_run("r1", "done", 1.5)
        s.start_run("r2", "nightly", "{}", "1" * 16)
        s.execute(f'CREATE TABLE "{ODD.replace(chr(34), chr(34) * 2)}" (a INTEGER, b VARCHAR)')
        s.execute(f'INSERT INTO "{ODD.replace(chr(34), chr(34) * 2)}" VALUES (1, \'x\'), (2, NULL), (3, \'z\')')
        counts = {t: s.fetch_one(f'SELECT count(*) AS n FROM "{t.replace(chr(34), chr(34) * 2)}"')["n"] for t in s.tables()}
    return p, counts


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_writes_every_table_with_its_rows(project, tmp_path, fmt):
    p, counts = project
    out = tmp_path / f"out-{fmt}"
    r = runner.invoke(app, ["export", "--project-dir", str(p), "--format", fmt, "--out", str(out)])
    assert r.exit_code == 0, r.output
    files = sorted(out.iterdir())
    assert len(files) == len(counts) and all(f.suffix == f".{fmt}" for f in files)
    assert not list(out.glob("*.partial"))
    runs = out / f"runs.{fmt}"
    if fmt == "parquet":
        assert len(pd.read_parquet(runs)) == counts["runs"] == 2
        for table, n in counts.items():  # every file has its table's row count
            if table != ODD:
                assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out / table}.parquet')").fetchall()[0][0] == n, table
    else:
        rows = [json.loads(line) for line in runs.read_text().splitlines()]
        assert len(rows) == counts["runs"] == 2 and {r["run_id"] for r in rows} == {"r1", "r2"}
    odd = [f for f in files if f.stem.startswith("odd")]
    assert len(odd) == 1 and '"' not in odd[0].name and "'" not in odd[0].name
    df = pd.read_parquet(odd[0]) if fmt == "parquet" else pd.read_json(odd[0], lines=True)
    assert len(df) == counts[ODD] == 3
    assert f"exported {len(counts)} tables" in r.output


def test_export_reads_without_writing_or_locking(project, tmp_path):
    """The export opens the database read-only: the file is unchanged and another reader can open it meanwhile."""
    from reverie.pipeline.export import export_tables

    p, counts = project
    db = p / "reverie.duckdb"
    before = db.read_bytes()
    with Store(p, read_only=True):
        done = export_tables(p, "parquet", tmp_path / "out")
    assert {t.table: t.rows for t in done} == counts
    assert db.read_bytes() == before


def test_export_errors_are_one_clear_line(tmp_path, project):
    p, _ = project
    r = runner.invoke(app, ["export", "--project-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no reverie database at" in r.output and "nothing to export" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "empty").exists()
    r = runner.invoke(app, ["export", "--project-dir", str(p), "--format", "csv", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--format 'csv': use parquet or jsonl" in r.output
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["export", "--project-dir", str(p), "--out", str(tmp_path / "afile")])
    assert r.exit_code == 2 and "is a file" in r.output
    r = runner.invoke(app, ["export", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "set project.dir" in r.output
