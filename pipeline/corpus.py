"""Corpus documents as a stream of strings: a hub dataset (``datasets`` streaming) or local files.

Local corpora: ``.jsonl`` (one JSON object per line, the Pile's ``{"text": ..., "meta": ...}``),
``.parquet``, ``.txt`` (blank-line-separated paragraphs grouped into documents), or a folder of
those (sorted by name). Nothing is held in memory beyond one file's current batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from pipeline.config import CorpusConfig
from pipeline.errors import LoadError
from pipeline.hub import check_hub_reachable, hub_offline, offline_error
from pipeline.paths import expand

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def corpus_files(cfg: CorpusConfig) -> list[Path]:
    """The local files of a corpus, in reading order.

    Raises:
        LoadError: the path is missing, or a folder holds no corpus file.
    """
    p = Path(expand(cfg.path)).resolve()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise LoadError(f"corpus folder {p} holds no {'/'.join(SUFFIXES)} file")
        return files
    raise LoadError(f"corpus not found: {p}. Set scan.corpus.path to a .jsonl/.parquet/.txt file or folder, or scan.corpus.hf_dataset.")


def corpus_identity(cfg: CorpusConfig) -> dict:
    """A JSON-able identity of the corpus (hub name + split, or files with size and mtime-free hash)."""
    if cfg.hf_dataset:
        return {"hf_dataset": cfg.hf_dataset, "split": cfg.hf_split, "text_column": cfg.text_column}
    files = []
    for f in corpus_files(cfg):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))  # first MiB + size: cheap and stable
        files.append({"path": str(f), "size": f.stat().st_size, "head_sha256": h.hexdigest()[:16]})
    return {"files": files, "text_column": cfg.text_column}


def _iter_file(path: Path, column: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LoadError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
                text = obj.get(column) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise LoadError(f"{path}:{n} has no string field {column!r}; set scan.corpus.text_column")
                yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise LoadError(f"{path} has no column {column!r} (columns: {pf.schema_arrow.names}); set scan.corpus.text_column")
        for batch in pf.iter_batches(columns=[column], batch_size=256):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        doc: list[str] = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    doc.append(line.rstrip("\n"))
                elif doc:
                    yield "\n".join(doc)
                    doc = []
        if doc:
            yield "\n".join(doc)


def iter_documents(cfg: CorpusConfig, skip: int = 0) -> Iterator[str]:
    """Stream document texts.

    Args:
        cfg: ``[scan.corpus]``.
        skip: documents to skip first (for resuming).

    Raises:
        OfflineError: a hub dataset while the hub is unreachable (within seconds).
        LoadError: a local file is missing or malformed.
    """
    if cfg.hf_dataset:
        yield from _iter_hub(cfg, skip)
        return
    seen = 0
    for f in corpus_files(cfg):
        for text in _iter_file(f, cfg.text_column):
            if seen >= skip:
                yield text
            seen += 1


def _iter_hub(cfg: CorpusConfig, skip: int) -> Iterator[str]:
    import datasets

    fix = "Set scan.corpus.path to a local .jsonl/.parquet/.txt corpus (e.g. '{shared}/corpora/tinystories-train.jsonl'), or run online."
    what = f"dataset {cfg.hf_dataset!r}"
    check_hub_reachable(what, fix)
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split, streaming=True)
    except Exception as e:  # noqa: BLE001
        if hub_offline():
            raise offline_error(what, fix, e) from None
        raise LoadError(f"cannot stream {what}: {type(e).__name__}: {e}") from None
    if skip:
        ds = ds.skip(skip)
    for row in ds:
        text = row.get(cfg.text_column)
        if isinstance(text, str) and text:
            yield text
