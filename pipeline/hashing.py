"""Content hashes of input files (model weights, SAE weights, corpora), cheap on a rerun.

A cache key that names an input by its path goes stale when the file is replaced in place (a
fixed SAE would silently reuse the scan of the broken one). Keys therefore name inputs by the
sha256 of their bytes. Hashing a multi-GB weight file takes seconds, so each file's hash is
cached by ``(resolved path, size, mtime_ns)``: in memory for the process, and on disk in
``$REVERIE_HASH_CACHE`` (default ``~/.cache/reverie/file-hashes.json``) across processes. A file
whose size or mtime changed is hashed again. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

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
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


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
