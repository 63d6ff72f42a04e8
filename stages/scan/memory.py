"""Texts and datasets in memory as a scan's corpus (the library's :func:`reverie.scan`; no files, no store).

The documents are read and cleaned exactly as :func:`pipeline.corpus.iter_documents` reads a
corpus file: control characters and lone surrogates cleaned (:func:`pipeline.corpus.clean_text`),
a document without text skipped and counted (or, with ``on_bad="fail"``, an error).
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from typing import Any, Iterable, Iterator, Sequence

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.corpus import CorpusStats, clean_text
from reverie.pipeline.errors import LoadError
from reverie.sae_targets.loading import Subject, check_latents
from reverie.sae_targets.selection import Target
from reverie.stages.scan.rows import ScanResult, scan_documents
from reverie.stages.scan.stage import Documents, scan_key, scan_latent_ids


def _text_of(doc: Any, text_column: str) -> Any:
    return doc.get(text_column) if isinstance(doc, dict) else doc


def text_documents(texts: Iterable[Any], text_column: str = "text", on_bad: str = "skip") -> Documents:
    """In-memory documents as :data:`stages.scan.stage.Documents`.

    Args:
        texts: strings, or rows (dicts) holding the text in ``text_column`` — a list, a
            ``datasets.Dataset`` / ``IterableDataset``, any iterable (read once per pass).
        text_column: the rows' text field.
        on_bad: 'skip' (count it in ``no_text``) or 'fail' for a document without a non-empty string.
    Returns:
        ``documents(skip, stats)`` yielding cleaned texts from document ``skip`` on.
    Raises:
        TypeError: ``texts`` is a single string (pass a list of texts).
        LoadError: (when iterated, with ``on_bad="fail"``) a document without text.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts is one string: pass a list of texts (each one document)")

    def documents(skip: int, stats: CorpusStats) -> Iterator[str]:
        for i, doc in enumerate(itertools.islice(texts, skip, None), start=skip):
            text = _text_of(doc, text_column)
            if not isinstance(text, str) or not text:
                if on_bad == "fail":
                    raise LoadError(f"document {i} has no text{f' in column {text_column!r}' if isinstance(doc, dict) else ''}; "
                                    "pass strings (or rows with a non-empty string text column), or on_bad='skip'")
                stats.add("no_text")
                continue
            stats.add("documents")
            yield clean_text(text, stats)

    return documents


def texts_identity(texts: Iterable[Any], text_column: str = "text") -> dict[str, Any]:
    """The corpus identity of in-memory documents (part of the scan id).

    A list or tuple is hashed (SHA-256 over its texts); a ``datasets`` dataset gives its
    fingerprint; anything else (a generator) gets a fresh random id.
    """
    if isinstance(texts, (list, tuple)):
        h = hashlib.sha256()
        for doc in texts:
            t = _text_of(doc, text_column)
            b = t.encode("utf-8", "surrogatepass") if isinstance(t, str) else repr(t).encode()
            h.update(len(b).to_bytes(8, "little") + b)
        return {"in_memory": "texts", "n": len(texts), "sha256": h.hexdigest()}
    fp = getattr(texts, "_fingerprint", None)
    if isinstance(fp, str):
        return {"in_memory": "dataset", "fingerprint": fp, "text_column": text_column}
    return {"in_memory": "iterable", "id": uuid.uuid4().hex}


def scan_texts(cfg: ReverieConfig, subject: Subject, targets: Sequence[Target], texts: Iterable[Any], text_column: str = "text",
               progress: bool = True) -> ScanResult:
    """Scan in-memory documents for ``targets`` (the single latents and combinations), no store.

    The same computation as the CLI's scan (:func:`stages.scan.rows.scan_documents`) on
    ``texts`` instead of ``scan.corpus``; nothing is checkpointed or written.

    Args:
        cfg: the settings (``[scan]`` without its corpus, ``[targets]``, ``dream.n_tokens`` = the window length).
        targets: their latents are scanned; combinations also get their objective's rows.
        texts: see :func:`text_documents`.
    Returns:
        :class:`stages.scan.rows.ScanResult`.
    Raises:
        TargetError: a latent id outside the SAE. ReverieError: too few tokens (see ``scan_documents``).
        TypeError / LoadError: see :func:`text_documents`.
    """
    latents = list(range(subject.d_sae)) if cfg.scan.all_latents else scan_latent_ids(targets)
    check_latents(latents, subject.d_sae)
    docs = text_documents(texts, text_column, cfg.scan.on_bad_document)
    sid = scan_key(cfg, subject, latents, corpus=texts_identity(texts, text_column))
    return scan_documents(cfg, subject, latents, sid, [t for t in targets if t.is_combination], documents=docs, progress=progress)
