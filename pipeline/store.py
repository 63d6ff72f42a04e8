"""The DuckDB store: one database file per project directory, the only place that writes.

Schema: versioned SQL files in ``pipeline/migrations/NNNN_name.sql``, applied in order by
:meth:`Store.migrate`; the applied version lives in ``schema_version``. DuckDB allows one
writer process at a time, so workers (e.g. Ray tasks) return results and the driver writes.

Writes go through :meth:`Store.insert`, :meth:`Store.replace` (delete-then-insert of one
logical unit in one transaction, which makes reruns idempotent) and the run helpers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import pyarrow as pa

from reverie.pipeline.errors import ReverieError, StoreWriteError

DB_NAME = "reverie.duckdb"
_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """All schema migrations as ``(version, name, sql)``, sorted by version.

    Raises:
        ReverieError: two files share a version number.
    """
    found: dict[int, tuple[int, str, str]] = {}
    for entry in resources.files("reverie.pipeline.migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if not m:
            continue
        v = int(m.group(1))
        if v in found:
            raise ReverieError(f"two migrations share version {v}: {found[v][1]} and {entry.name}")
        found[v] = (v, entry.name, entry.read_text())
    return [found[v] for v in sorted(found)]


def code_version() -> str:
    """'<package version>+<git short sha>[-dirty]' (git part omitted outside a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("reverie")
    except PackageNotFoundError:
        ver = "0+unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{ver}+{sha}{'-dirty' if dirty else ''}" if sha else ver


def free_space(path: str | Path) -> str:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), e.g. '1.2 GiB free', or 'free space unknown'."""
    import shutil

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free} bytes free"


_WRITE_ERRORS = (duckdb.IOException, duckdb.FatalException, OSError)


def _is_write_failure(exc: BaseException) -> bool:
    """Whether a database error means the file cannot be written (disk full, read-only, invalidated)."""
    if isinstance(exc, StoreWriteError):
        return False
    if isinstance(exc, _WRITE_ERRORS):
        return True
    text = str(exc).lower()
    return isinstance(exc, duckdb.Error) and any(k in text for k in ("invalidated", "no space left", "read-only file system", "disk full"))


def write_failure(path: str | Path, exc: BaseException, doing: str = "write to") -> StoreWriteError:
    """The one clear message for a failed write: what failed, the path, the free space, what to do."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    first = lines[0] if lines else type(exc).__name__
    if len(first) > 300:
        first = first[:300] + "…"
    folder = Path(path).parent
    return StoreWriteError(
        f"cannot {doing} {path}: {type(exc).__name__}: {first} ({free_space(folder)} on {folder}). "
        "Everything committed before this is kept: free disk space (or make the folder and file writable, or set project.dir "
        "to another folder), then rerun the same command; a nightly resumes its run id.")


def now() -> dt.datetime:
    """Current UTC time (naive, as DuckDB TIMESTAMP stores it)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def open_failure(path: Path, exc: BaseException) -> ReverieError:
    """The message for a database that cannot be opened: locked by another writer, unwritable, or not a DuckDB file."""
    text = str(exc)
    low = text.lower()
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    if "lock" in low:
        return ReverieError(f"cannot open {path}: {first}. DuckDB allows one writer process at a time: "
                            "wait for the other reverie process to finish, or use another project.dir")
    if any(k in low for k in ("permission denied", "read-only", "no space left")):
        return write_failure(path, exc, doing="open")
    return ReverieError(f"{path} is not a readable reverie database ({type(exc).__name__}: {first}): the file is truncated, corrupt "
                        "or not a DuckDB file. Move it aside (reverie then starts a new database there; finished work in it is lost "
                        "unless you restore it from a backup), or set project.dir to another folder.")


class Store:
    """A project's DuckDB database.

    Args:
        project_dir: folder of the project; the database is ``<project_dir>/reverie.duckdb``.
        read_only: open without write access (several readers may coexist; no writer then).

    Raises:
        ReverieError: the file is locked by another writer process, or is not a DuckDB file.
    """

    def __init__(self, project_dir: str | Path, read_only: bool = False):
        self.project_dir = Path(project_dir)
        self.path = self.project_dir / DB_NAME
        self.read_only = read_only
        if not read_only:
            try:
                self.project_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ReverieError(
                    f"cannot create the project folder {self.project_dir}: {e.strerror or e} "
                    f"({'a file is in the way' if isinstance(e, (FileExistsError, NotADirectoryError)) else free_space(self.project_dir)}). "
                    "Set project.dir (or --project-dir) to a writable folder.") from None
        elif not self.path.exists():
            raise ReverieError(f"no reverie database at {self.path}; run a stage first (e.g. `reverie targets`) or fix project.dir")
        elif self.path.is_dir():
            raise ReverieError(f"{self.path} is a folder, not a database file; move it aside or fix project.dir")
        try:
            self.conn = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as e:
            raise open_failure(self.path, e) from None
        self._in_txn = False
        if not read_only:
            try:
                self.migrate()
            except ReverieError:
                self.conn.close()
                raise
            except duckdb.Error as e:
                self.conn.close()
                raise open_failure(self.path, e) from None

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed write (disk full, read-only file, invalidated database) into one
        :class:`~pipeline.errors.StoreWriteError` naming the path and the free space."""
        try:
            yield
        except BaseException as e:
            if _is_write_failure(e):
                raise write_failure(self.path, e) from None
            raise

    # ------------------------------------------------------------------ schema
    @property
    def version(self) -> int:
        """Applied schema version (0 for an empty database)."""
        exists = self.conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchall()[0][0]
        if not exists:
            return 0
        rows = self.conn.execute("SELECT max(version) FROM schema_version").fetchall()  # fetchall: leave no open result
        return int(rows[0][0] or 0)

    def migrate(self) -> int:
        """Apply every migration newer than the database's version, each in one transaction.

        Returns:
            The schema version after migrating.
        Raises:
            ReverieError: the database is newer than this code (downgrade).
        """
        self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, name VARCHAR, applied_at TIMESTAMP)")
        current = self.version
        known = migrations()
        latest = known[-1][0] if known else 0
        if current > latest:
            raise ReverieError(
                f"{self.path} has schema version {current}, newer than this reverie ({latest}); upgrade reverie or use another project.dir"
            )
        for version, name, sql in known:
            if version <= current:
                continue
            with self.transaction():
                self.conn.execute(sql)
                self.conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, name, now()])
        return self.version

    def tables(self) -> list[str]:
        """Names of the tables in the database."""
        return [r[0] for r in self.conn.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]

    # ------------------------------------------------------------------ writes
    @contextmanager
    def transaction(self) -> Iterator["Store"]:
        """All writes inside commit together or not at all (nested calls join the outer one)."""
        if self._in_txn:
            yield self
            return
        with self._writing():
            self.conn.execute("BEGIN TRANSACTION")
        self._in_txn = True
        try:
            yield self
        except BaseException:
            try:
                self.conn.execute("ROLLBACK")
            except duckdb.Error:  # the database may be invalidated by the very failure being raised
                pass
            raise
        else:
            with self._writing():
                self.conn.execute("COMMIT")
        finally:
            self._in_txn = False

    def insert(self, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert rows (dicts keyed by column name; all rows share the first row's keys).

        Lists go to DuckDB list columns, dicts are stored as JSON text. Uses an Arrow batch, so
        thousands of rows insert in one statement.

        Returns:
            Number of rows inserted.
        Raises:
            ReverieError: a row lacks a column that the first row has.
        """
        if not rows:
            return 0
        cols = list(rows[0].keys())
        data: dict[str, list[Any]] = {c: [] for c in cols}
        for i, r in enumerate(rows):
            if set(r.keys()) != set(cols):
                raise ReverieError(f"insert into {table}: row {i} has columns {sorted(r)} but row 0 has {sorted(cols)}")
            for c in cols:
                v = r[c]
                data[c].append(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
        batch = pa.table(data)
        with self._writing():
            self.conn.register("_reverie_batch", batch)
            try:
                col_sql = ", ".join(f'"{c}"' for c in cols)
                self.conn.execute(f'INSERT INTO "{table}" ({col_sql}) SELECT {col_sql} FROM _reverie_batch')
            finally:
                try:
                    self.conn.unregister("_reverie_batch")
                except duckdb.Error:
                    pass
        return len(rows)

    def delete(self, table: str, where: Mapping[str, Any]) -> None:
        """Delete the rows whose columns equal ``where``'s values (an empty ``where`` is refused)."""
        if not where:
            raise ReverieError(f"refusing to delete every row of {table}")
        cond = " AND ".join(f'"{k}" = ?' for k in where)
        with self._writing():
            self.conn.execute(f'DELETE FROM "{table}" WHERE {cond}', list(where.values()))

    def replace(self, table: str, where: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> int:
        """Delete the rows matching ``where`` and insert ``rows``, in one transaction.

        The idempotent write of one unit's rows: rerunning a unit never duplicates them.
        """
        with self.transaction():
            self.delete(table, where)
            return self.insert(table, rows)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one write statement (for updates the helpers above do not cover).

        Raises:
            StoreWriteError: the database cannot be written (disk full, read-only).
        """
        with self._writing():
            self.conn.execute(sql, params or [])

    # ------------------------------------------------------------------ reads
    def fetch(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a query and return rows as dicts."""
        cur = self.conn.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def fetch_one(self, sql: str, params: Sequence[Any] | None = None) -> dict[str, Any] | None:
        """First row of a query as a dict, or None."""
        rows = self.fetch(sql, params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------ runs
    def start_run(self, run_id: str, kind: str, config_json: str, config_hash: str) -> bool:
        """Record a run as running. Returns False (and marks it running again, clearing its error)
        if it existed: a resume. A resumed run keeps its ``wall_s`` (see :meth:`run_wall_s`)."""
        with self.transaction():
            existing = self.fetch_one("SELECT run_id FROM runs WHERE run_id = ?", [run_id])
            if existing:
                self.execute("UPDATE runs SET status = 'running', ended_at = NULL, error = NULL WHERE run_id = ?", [run_id])
                return False
            self.insert("runs", [{
                "run_id": run_id, "kind": kind, "config_json": config_json, "config_hash": config_hash,
                "code_version": code_version(), "started_at": now(), "ended_at": None,
                "status": "running", "wall_s": None, "summary_json": None,
            }])
            return True

    RUN_STATUSES = ("running", "done", "failed", "interrupted")

    def finish_run(self, run_id: str, status: str, wall_s: float | None = None, summary: Mapping[str, Any] | None = None,
                   error: str | None = None) -> None:
        """Mark a run finished.

        Args:
            status: 'done' | 'failed' | 'interrupted' (or 'running' for a progress update).
            wall_s: the run's total wall time in seconds over every session (a resumed run adds
                this session's seconds to :meth:`run_wall_s`); None keeps the stored value.
            summary: JSON-able summary (replaces the stored one; None = an empty summary).
            error: why the run failed or stopped ('ExceptionType: message'), or None.
        Raises:
            ReverieError: an unknown status.
        """
        if status not in self.RUN_STATUSES:
            raise ReverieError(f"unknown run status {status!r}; one of {', '.join(self.RUN_STATUSES)}")
        self.execute(
            "UPDATE runs SET status = ?, ended_at = ?, wall_s = coalesce(?, wall_s), summary_json = ?, error = ? WHERE run_id = ?",
            [status, now(), wall_s, json.dumps(dict(summary or {}), sort_keys=True, default=str), error, run_id],
        )

    def run_wall_s(self, run_id: str) -> float:
        """Wall time (seconds) a run has recorded so far over its sessions; 0.0 for a new run."""
        row = self.fetch_one("SELECT wall_s FROM runs WHERE run_id = ?", [run_id])
        return float(row["wall_s"] or 0.0) if row else 0.0

    def set_report_key(self, run_id: str, key: str | None) -> None:
        """Store the key of the inputs a run's report was rendered from (None: none rendered)."""
        self.execute("UPDATE runs SET report_key = ? WHERE run_id = ?", [key, run_id])

    def close(self) -> None:
        """Close the connection (the file lock is released)."""
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
