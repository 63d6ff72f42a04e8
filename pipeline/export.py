"""Export every table of a project's database as files: one Parquet or JSON-lines file per table.

The database is opened read-only through :class:`~pipeline.store.Store` (it never migrates or
writes), and every table is written by DuckDB's own ``COPY (SELECT * FROM "table") TO 'file'``
inside one read transaction, so all files come from the same snapshot. Each file is written
under a temporary name and renamed when complete, so a file of the export folder is never half
written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from reverie.pipeline.errors import ConfigError, ReverieError, StoreWriteError
from reverie.pipeline.store import DB_NAME, Store, free_space

FORMATS = {"parquet": ("parquet", "(FORMAT parquet)"), "jsonl": ("jsonl", "(FORMAT json)")}
"""``--format`` → (file extension, DuckDB ``COPY`` options); DuckDB's json format writes one object per line."""


@dataclass
class ExportedTable:
    """One exported table: its name, the file written and its row count."""

    table: str
    path: Path
    rows: int


def quote_ident(name: str) -> str:
    """``name`` as a DuckDB identifier in double quotes (embedded quotes doubled): safe for any table name."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as a SQL string literal in single quotes (embedded quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def file_stem(table: str, taken: set[str]) -> str:
    """A file name stem for ``table``: letters, digits, ``_``, ``-`` and ``.`` kept, anything else
    replaced by ``_``; a numeric suffix when two tables map to the same stem (compared
    case-insensitively, for case-insensitive filesystems). Adds the stem to ``taken``."""
    stem = re.sub(r"[^0-9A-Za-z_.-]", "_", table).lstrip(".") or "table"
    out, i = stem, 2
    while out.lower() in taken:
        out, i = f"{stem}_{i}", i + 1
    taken.add(out.lower())
    return out


def export_tables(project_dir: str | Path, fmt: str, out: str | Path) -> list[ExportedTable]:
    """Write every base table of the project's database to ``out/<table>.<parquet|jsonl>``.

    Args:
        project_dir: the project folder (``project.dir``) holding ``reverie.duckdb``.
        fmt: 'parquet' or 'jsonl' (one JSON object per line).
        out: the export folder; created if missing; files of the same names are replaced.

    Returns:
        One :class:`ExportedTable` per table, in name order, with the rows written.

    Raises:
        ConfigError: an unknown ``fmt``, or ``out`` is a file (exit code 2).
        ReverieError: the project has no database, or it cannot be opened (locked by a running
            writer, not a DuckDB file) (exit code 2).
        StoreWriteError: a file of the export cannot be written (disk full, read-only folder) (exit code 1).
    """
    import duckdb

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    ext, options = FORMATS[fmt]
    db = Path(project_dir) / DB_NAME
    if not db.is_file():
        raise ReverieError(f"no reverie database at {db}: nothing to export. Check project.dir (or --project-dir) names a project "
                           "that a stage has written (e.g. `reverie targets --record`, `reverie nightly`)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreWriteError(f"cannot create the export folder {out}: {e.strerror or e} ({free_space(out)}). "
                              "Choose a writable --out folder.") from e
    done: list[ExportedTable] = []
    with Store(project_dir, read_only=True) as store:
        conn = store.conn
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND table_type = 'BASE TABLE' "
            "ORDER BY table_name").fetchall()]
        taken: set[str] = set()
        conn.execute("BEGIN TRANSACTION")  # one snapshot for every table
        try:
            for table in tables:
                target = out / f"{file_stem(table, taken)}.{ext}"
                partial = target.with_name(target.name + ".partial")
                rows = int(conn.execute(f"SELECT count(*) FROM {quote_ident(table)}").fetchall()[0][0])
                try:
                    conn.execute(f"COPY (SELECT * FROM {quote_ident(table)}) TO {quote_literal(str(partial))} {options}")
                    os.replace(partial, target)
                except (duckdb.Error, OSError) as e:
                    partial.unlink(missing_ok=True)
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    raise StoreWriteError(f"cannot write {target}: {type(e).__name__}: {first} ({free_space(out)}). "
                                          "Free disk space or choose another --out folder, then rerun the export.") from e
                done.append(ExportedTable(table, target, rows))
        finally:
            conn.execute("ROLLBACK")  # read-only: nothing to commit
    return done
