"""Content hashes of input files (model weights, SAE weights, corpora), cheap on a rerun.

A cache key that names an input by its path goes stale when the file is replaced in place (a
fixed SAE would silently reuse the scan of the broken one). Keys therefore name inputs by the
sha256 of their bytes. Hashing a multi-GB weight file takes seconds, so each file's hash is
cached by ``(resolved path, size, mtime_ns)``: in memory for the process, and on disk in
``$REVERIE_HASH_CACHE`` (default ``~/.cache/reverie/file-hashes.json``) across processes. A file
whose size or mtime changed is hashed again. A cache that cannot be read or written is ignored.

Keys of content (settings, configurations, prompts) are sha256 of canonical JSON:
:func:`content_key` (a hex string) and :func:`content_seed` (an integer seed), the one definition
every cache key, scan id and derived seed uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("reverie.hashing")

CACHE_ENV = "REVERIE_HASH_CACHE"
_CHUNK = 1 << 22  # 4 MiB reads
_lock = threading.Lock()
_memory: dict[str, str] = {}
_disk_loaded = False

# files of a model / SAE folder whose bytes define it (weights, configs, tokenizer)
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
SAE_FILES = ("*.safetensors", "*.bin", "*.pt", "cfg.json", "activation_scaler.json")


def content_key(obj: Any, length: int | None = 16, *, ensure_ascii: bool = True,
                default: Callable[[Any], Any] | None = None) -> str:
    """sha256 (hex) of the canonical JSON of ``obj``: ``json.dumps(obj, sort_keys=True)`` as UTF-8.

    The bytes hashed are exactly those of that call, so keys stored before this function existed
    (scan ids, config fingerprints, dream fingerprints, LLM cache keys) keep their values.

    Args:
        obj: a JSON-able value (dict keys are sorted at every level; list order counts).
        length: hex characters kept (16 = 64 bits); None keeps all 64.
        ensure_ascii: ``json.dumps``' flag (True escapes non-ASCII as ``\\uXXXX``; the LLM cache
            key hashes the characters themselves, False).
        default: ``json.dumps``' fallback for values JSON cannot encode (e.g. ``str``); None raises.
    Returns:
        ``length`` lowercase hex characters.
    Raises:
        TypeError: ``obj`` holds a value JSON cannot encode and no ``default`` was given.
    """
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=ensure_ascii, default=default)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return digest if length is None else digest[:length]


def content_seed(*parts: object) -> int:
    """A deterministic 64-bit seed from ``parts``: the first 8 bytes (big-endian) of the sha256 of
    ``':'.join(str(p) for p in parts)``. Independent of ``PYTHONHASHSEED``, unlike ``hash()``.

    Returns:
        An int in ``[0, 2**64)``; take ``% 2**32`` for generators that need 32 bits.
    """
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def cache_path() -> Path:
    """Where file hashes persist across processes (``$REVERIE_HASH_CACHE`` or ``~/.cache/reverie/file-hashes.json``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reverie" / "file-hashes.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        data = json.loads(cache_path().read_text())
        if isinstance(data, dict):
            _memory.update({str(k): str(v) for k, v in data.items() if isinstance(v, str)})
    except (OSError, ValueError):
        pass


def _save_disk() -> None:
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_memory, sort_keys=True))
        os.replace(tmp, p)
    except OSError as e:  # a read-only home: hashes are recomputed next time, nothing else changes
        log.debug("could not write the file-hash cache %s: %s", p, e)


def file_sha256(path: str | Path) -> str:
    """sha256 (64 hex characters) of a file's bytes, cached by path, size and mtime.

    Args:
        path: a regular file.
    Returns:
        The hex digest.
    Raises:
        OSError: the file cannot be read.
    """
    p = Path(path).resolve()
    stamp = _stamp(p)
    with _lock:
        _load_disk()
        hit = _memory.get(stamp)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        # forget older stamps of the same path, so the cache does not grow with every edit
        for k in [k for k in _memory if k.startswith(f"{p}|")]:
            del _memory[k]
        _memory[stamp] = digest
        _save_disk()
    return digest


def files_sha256(files: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One sha256 (16 hex characters) over several files: their names (relative to ``root``) and content hashes."""
    items = []
    for f in sorted(Path(x) for x in files):
        name = str(f.relative_to(root)) if root is not None else str(f)
        items.append([name, file_sha256(f)])
    return content_key(items)


def dir_sha256(folder: str | Path, patterns: Iterable[str]) -> str:
    """Content hash (16 hex characters) of the files in ``folder`` (not recursive) matching ``patterns``.

    Args:
        folder: e.g. a Hugging Face model folder or a sae-lens SAE folder.
        patterns: glob patterns, e.g. :data:`MODEL_FILES`.
    Returns:
        The hash; a folder with no matching file hashes to the hash of an empty list.
    """
    d = Path(folder).resolve()
    files = {f for pat in patterns for f in d.glob(pat) if f.is_file()}
    return files_sha256(files, root=d)
