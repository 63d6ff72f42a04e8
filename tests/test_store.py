"""DuckDB store: versioned schema, migration of an older database, idempotent writes."""

from __future__ import annotations

import duckdb
import pytest

from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import DB_NAME, Store, migrations


def test_fresh_database_has_latest_schema(tmp_path):
    with Store(tmp_path) as s:
        assert s.version == migrations()[-1][0]
        tables = set(s.tables())
    assert {"runs", "targets", "units", "schema_version"} <= tables


def test_migrates_an_older_database(tmp_path):
    # a database made by an older reverie: only migration 0001 applied
    first = migrations()[0]
    con = duckdb.connect(str(tmp_path / DB_NAME))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, name VARCHAR, applied_at TIMESTAMP)")
    con.execute(first[2])
    con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [first[0], first[1]])
    con.execute("INSERT INTO runs VALUES ('old', 'targets', '{}', 'h', 'v', now(), NULL, 'done', NULL, NULL)")
    con.close()
    with Store(tmp_path) as s:
        assert s.version == migrations()[-1][0]
        assert s.fetch("SELECT run_id FROM runs") == [{"run_id": "old"}]  # data kept
        versions = [r["version"] for r in s.fetch("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [m[0] for m in migrations()]


def test_refuses_newer_database(tmp_path):
    with Store(tmp_path) as s:
        s.execute("INSERT INTO schema_version VALUES (999, '9999_future.sql', now())")
    with pytest.raises(ReverieError, match="newer than this reverie"):
        Store(tmp_path)


def test_replace_is_idempotent_and_transactional(tmp_path):
    rows = [{"run_id": "r", "target_id": str(i), "model_key": "m", "sae_key": "s", "hook_name": "h",
             "latents": [i], "combine": None, "log10_density": [-2.0], "density_source": "x"} for i in range(3)]
    with Store(tmp_path) as s:
        s.replace("targets", {"run_id": "r"}, rows)
        s.replace("targets", {"run_id": "r"}, rows)
        assert s.fetch_one("SELECT count(*) AS n FROM targets")["n"] == 3
        assert s.fetch_one("SELECT latents FROM targets WHERE target_id = '2'")["latents"] == [2]
        with pytest.raises(RuntimeError):
            with s.transaction():
                s.delete("targets", {"run_id": "r"})
                raise RuntimeError("crash mid-unit")
        assert s.fetch_one("SELECT count(*) AS n FROM targets")["n"] == 3  # rolled back


def test_runs_resume(tmp_path):
    with Store(tmp_path) as s:
        assert s.start_run("r1", "nightly", "{}", "h") is True
        s.finish_run("r1", "failed", 1.0, {"failed": 1})
        assert s.start_run("r1", "nightly", "{}", "h") is False
        assert s.fetch_one("SELECT status FROM runs WHERE run_id='r1'")["status"] == "running"
        assert s.fetch_one("SELECT code_version FROM runs")["code_version"].startswith("0.1.0")


def test_one_writer_at_a_time(tmp_path):
    import subprocess
    import sys

    with Store(tmp_path):
        code = f"from pipeline.store import Store\nStore({str(tmp_path)!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "one writer process at a time" in r.stderr


def test_insert_rejects_ragged_rows(tmp_path):
    with Store(tmp_path) as s:
        with pytest.raises(ReverieError, match="row 1"):
            s.insert("units", [{"run_id": "r", "target_id": "1", "stage": "dream", "status": "done"}, {"run_id": "r"}])


def test_insert_right_after_open(tmp_path):
    """Regression: a fresh Store's first call being insert() must not hit an open result set."""
    Store(tmp_path).close()
    with Store(tmp_path) as s:
        s.insert("units", [{"run_id": "r", "target_id": "1", "stage": "dream", "status": "done"}])
        assert s.fetch_one("SELECT count(*) AS n FROM units")["n"] == 1
