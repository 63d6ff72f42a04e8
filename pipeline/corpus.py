"""Corpus documents as a stream of strings: a hub dataset (``datasets`` streaming) or local files.

Local corpora: ``.jsonl`` (one JSON object per line, the Pile's ``{"text": ..., "meta": ...}``),
``.parquet``, ``.txt`` (blank-line-separated paragraphs grouped into documents), or a folder of
those (sorted by name). Nothing is held in memory beyond one file's current batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from reverie.pipeline.config import CorpusConfig
from reverie.pipeline.errors import LoadError
from reverie.pipeline.hub import check_hub_reachable, hub_errors
from reverie.pipeline.paths import expand

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def corpus_files(cfg: CorpusConfig) -> list[Path]:
    """The local files of a corpus, in reading order.

    Raises:
        LoadError: the path is missing, or a folder holds no corpus file.
        ConfigError: no corpus is configured (neither scan.corpus.path nor scan.corpus.hf_dataset).
    """
    p = Path(expand(cfg.require().path)).resolve()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise LoadError(f"corpus folder {p} holds no {'/'.join(SUFFIXES)} file")
        return files
    raise LoadError(f"corpus not found: {p}. Set scan.corpus.path to a .jsonl/.parquet/.txt file or folder, or scan.corpus.hf_dataset.")


def corpus_identity(cfg: CorpusConfig) -> dict:
    """A JSON-able identity of the corpus: hub name + split, or each local file's full content
    hash (sha256, cached by path + size + mtime: :func:`pipeline.hashing.file_sha256`), so a
    file changed in place is a different corpus.

    Raises:
        ConfigError: no corpus is configured. LoadError: see :func:`corpus_files`.
    """
    from reverie.pipeline.hashing import file_sha256

    cfg.require()
    if cfg.hf_dataset:
        return {"hf_dataset": cfg.hf_dataset, "split": cfg.hf_split, "text_column": cfg.text_column}
    files = []
    for f in corpus_files(cfg):
        files.append({"path": str(f), "size": f.stat().st_size, "sha256": file_sha256(f)[:16]})
    return {"files": files, "text_column": cfg.text_column}


# ----------------------------------------------------------------------------- corpora as they come

# C0 / C1 control characters other than tab, newline and carriage return, and lone surrogates
# (a JSON line may hold "\ud800"; tokenizers reject such strings): removed / replaced before tokenization
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass
class CorpusStats:
    """What reading a corpus had to repair or skip. ``counts`` is a plain dict (stored with the scan):

    * ``bad_lines``: JSON lines that do not parse (skipped);
    * ``no_text``: documents without a string text field / column (skipped);
    * ``bad_bytes``: bytes that are not valid UTF-8 (each replaced by U+FFFD);
    * ``cleaned_chars``: control characters removed and lone surrogates replaced by U+FFFD;
    * ``documents``: documents yielded.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    @property
    def skipped(self) -> int:
        """Documents skipped (unparsable lines + documents without text)."""
        return self.counts.get("bad_lines", 0) + self.counts.get("no_text", 0)


STAT_KEYS = ("documents", "bad_lines", "no_text", "bad_bytes", "cleaned_chars")


def clean_text(text: str, stats: CorpusStats | None = None) -> str:
    """``text`` safe to tokenize: control characters other than ``\\t``, ``\\n``, ``\\r``
    removed, lone surrogates replaced by U+FFFD (both counted in ``stats.cleaned_chars``)."""
    n = 0
    if _SURROGATE_RE.search(text):
        text, k = _SURROGATE_RE.subn("\ufffd", text)
        n += k
    if _CONTROL_RE.search(text):
        text, k = _CONTROL_RE.subn("", text)
        n += k
    if n and stats is not None:
        stats.add("cleaned_chars", n)
    return text


def _decode(raw: bytes, stats: CorpusStats | None) -> str:
    """UTF-8 with every invalid byte replaced by U+FFFD (and counted)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if stats is not None:
            stats.add("bad_bytes", sum(1 for ch in raw.decode("utf-8", "surrogateescape") if "\udc80" <= ch <= "\udcff"))
        return raw.decode("utf-8", "replace")


def _bad(what: str, on_bad: str, key: str, stats: CorpusStats | None) -> None:
    """Count a skipped document, or raise when ``scan.on_bad_document = "fail"``."""
    if on_bad == "fail":
        raise LoadError(f"{what}. Fix or remove it, or set scan.on_bad_document = \"skip\" to skip such documents (they are counted).")
    if stats is not None:
        stats.add(key)


def _iter_file(path: Path, column: str, stats: CorpusStats | None = None, on_bad: str = "skip") -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                line = _decode(raw, stats).strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object", on_bad, "bad_lines", stats)
                    continue
                text = obj.get(column) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    _bad(f"{path}:{n} has no string field {column!r} (set scan.corpus.text_column if the text is elsewhere)", on_bad, "no_text", stats)
                    continue
                yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise LoadError(f"{path} has no column {column!r} (columns: {pf.schema_arrow.names}); set scan.corpus.text_column")
        for batch in pf.iter_batches(columns=[column], batch_size=256):
            for t in batch.column(0).to_pylist():
                if isinstance(t, str) and t:
                    yield t
                else:
                    _bad(f"{path} has a row whose {column!r} is empty or not text", on_bad, "no_text", stats)
    else:
        doc: list[str] = []
        with open(path, "rb") as fh:
            for raw in fh:
                line = _decode(raw, stats)
                if line.strip():
                    doc.append(line.rstrip("\r\n"))
                elif doc:
                    yield "\n".join(doc)
                    doc = []
        if doc:
            yield "\n".join(doc)


def iter_documents(cfg: CorpusConfig, skip: int = 0, stats: CorpusStats | None = None, on_bad: str = "skip") -> Iterator[str]:
    """Stream document texts, as they come: invalid UTF-8 bytes are replaced, unparsable JSON
    lines and documents without text are skipped, control characters and lone surrogates are
    cleaned (:func:`clean_text`); every repair and skip is counted in ``stats``.

    Args:
        cfg: ``[scan.corpus]``.
        skip: documents to skip first (for resuming; skipped lines of local files are still read
            and counted, so ``stats`` covers the corpus from its start).
        stats: where repairs and skips are counted (None: not counted).
        on_bad: ``scan.on_bad_document``: "skip" (default) or "fail" (a bad document raises).

    Raises:
        OfflineError: a hub dataset while the hub is unreachable (within seconds).
        LoadError: a local file is missing, a parquet file lacks the text column, or (with
            ``on_bad="fail"``) a document is unparsable or has no text.
        ConfigError: no corpus is configured (neither scan.corpus.path nor scan.corpus.hf_dataset).
    """
    cfg.require()
    if cfg.hf_dataset:
        for text in _iter_hub(cfg, skip, stats, on_bad):
            if stats is not None:
                stats.add("documents")
            yield clean_text(text, stats)
        return
    seen = 0
    for f in corpus_files(cfg):
        for text in _iter_file(f, cfg.text_column, stats, on_bad):
            if seen >= skip:
                text = clean_text(text, stats)
            if stats is not None:
                stats.add("documents")
            if seen >= skip:
                yield text
            seen += 1


def _iter_hub(cfg: CorpusConfig, skip: int, stats: CorpusStats | None = None, on_bad: str = "skip") -> Iterator[str]:
    import datasets

    fix = "Set scan.corpus.path to a local .jsonl/.parquet/.txt corpus (e.g. '{shared}/corpora/tinystories-train.jsonl'), or run online."
    what = f"dataset {cfg.hf_dataset!r}"
    check_hub_reachable(what, fix, datasets=True)
    with hub_errors(what, fix, datasets=True):
        ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split, streaming=True)
    if skip:
        ds = ds.skip(skip)
    for row in ds:
        text = row.get(cfg.text_column)
        if isinstance(text, str) and text:
            yield text
        else:
            _bad(f"a row of {what} has no text in column {cfg.text_column!r}", on_bad, "no_text", stats)


def corpus_count_columns(counts: dict | None) -> dict[str, int]:
    """``scans`` columns of a pass's :class:`CorpusStats` counts (``corpus_<key>``, 0 where unknown)."""
    counts = counts or {}
    return {f"corpus_{k}": int(counts.get(k, 0)) for k in STAT_KEYS}
