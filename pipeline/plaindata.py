"""Plain-data serialization for state kept in the database: JSON + numpy arrays, never code.

A database is data: reading a blob from ``reverie.duckdb`` must never run code (a pickle runs
whatever its author chose when it is loaded). :func:`dumps` turns a tree of plain values and
objects of *registered* classes into one blob:

* the blob is an ``.npz`` archive (``numpy.savez``) whose member ``__tree__`` is UTF-8 JSON and
  whose other members are the numeric arrays of the tree (``arr0``, ``arr1`` ...);
* in the JSON, ``{"__nd__": i}`` is array ``arr<i>``, ``{"__tuple__": [...]}`` a tuple,
  ``{"__map__": [[k, v], ...]}`` a dict with non-string keys, ``{"__obj__": "Name", "fields":
  {...}}`` an object of a registered class (its ``__dict__``), ``{"__float__": "nan"}`` a non-finite
  float.

:func:`loads` reads it back with ``numpy.load(..., allow_pickle=False)`` (object arrays are
refused) and ``json.loads``, and rebuilds objects only of the classes the caller names, by
creating the instance without calling ``__init__`` and setting its attributes: no constructor,
no ``__reduce__``, no import by name. Anything else (a pickle, a truncated or foreign blob, an
unknown class name) raises :class:`PlainDataError`.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any, Iterable

import numpy as np

MAGIC = b"REVERIE-PLAIN-1\n"
_TREE = "__tree__"


class PlainDataError(ValueError):
    """A blob is not reverie plain data (a pickle, truncated, foreign, or names an unknown class)."""


def _encode(obj: Any, arrays: list[np.ndarray], classes: dict[type, str], memo: dict[int, int] | None = None) -> Any:
    memo = {} if memo is None else memo
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else {"__float__": repr(f)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise PlainDataError("an object array cannot be stored as plain data")
        arrays.append(obj)
        return {"__nd__": len(arrays) - 1}
    if isinstance(obj, (list, tuple)):
        items = [_encode(x, arrays, classes, memo) for x in obj]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, arrays, classes, memo) for k, v in obj.items()}
        return {"__map__": [[_encode(k, arrays, classes, memo), _encode(v, arrays, classes, memo)] for k, v in obj.items()]}
    name = classes.get(type(obj))
    if name is None:
        raise PlainDataError(f"{type(obj).__qualname__} is not a registered plain-data class")
    if id(obj) in memo:  # the same object again (e.g. a candidate in a list and in an index): stored once
        return {"__ref__": memo[id(obj)]}
    memo[id(obj)] = len(memo)
    return {"__obj__": name, "__id__": memo[id(obj)], "fields": {k: _encode(v, arrays, classes, memo) for k, v in vars(obj).items()}}


def _hashable(x: Any) -> Any:
    return tuple(_hashable(i) for i in x) if isinstance(x, list) else x


def _decode(obj: Any, arrays: dict[str, np.ndarray], classes: dict[str, type], refs: dict[int, Any] | None = None) -> Any:
    refs = {} if refs is None else refs
    if isinstance(obj, list):
        return [_decode(x, arrays, classes, refs) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__nd__" in obj:
        key = f"arr{int(obj['__nd__'])}"
        if key not in arrays:
            raise PlainDataError(f"array {key} is missing")
        return arrays[key]
    if "__tuple__" in obj:
        return tuple(_decode(x, arrays, classes, refs) for x in obj["__tuple__"])
    if "__float__" in obj:
        v = obj["__float__"]
        if v not in ("nan", "inf", "-inf"):
            raise PlainDataError(f"bad float {v!r}")
        return float(v)
    if "__map__" in obj:
        return {_hashable(_decode(k, arrays, classes, refs)): _decode(v, arrays, classes, refs) for k, v in obj["__map__"]}
    if "__ref__" in obj:
        if obj["__ref__"] not in refs:
            raise PlainDataError(f"reference to an unknown object {obj['__ref__']!r}")
        return refs[obj["__ref__"]]
    if "__obj__" in obj:
        cls = classes.get(obj["__obj__"])
        if cls is None:
            raise PlainDataError(f"unknown class {obj['__obj__']!r} (known: {', '.join(sorted(classes))})")
        inst = cls.__new__(cls)  # no __init__, no __reduce__: attributes only
        if "__id__" in obj:
            refs[obj["__id__"]] = inst
        fields = obj.get("fields")
        if not isinstance(fields, dict):
            raise PlainDataError(f"object {obj['__obj__']!r} without fields")
        inst.__dict__.update({str(k): _decode(v, arrays, classes, refs) for k, v in fields.items()})
        return inst
    return {k: _decode(v, arrays, classes, refs) for k, v in obj.items()}


def dumps(obj: Any, classes: Iterable[type] = ()) -> bytes:
    """Serialize ``obj`` as plain data (see the module docstring).

    Args:
        obj: nested None/bool/int/float/str, lists, tuples, dicts, numpy arrays (not object
            arrays), and objects of ``classes`` (their ``__dict__`` is stored).
        classes: the classes allowed in the tree (by ``__qualname__``).
    Returns:
        The blob: :data:`MAGIC` + an ``.npz`` archive.
    Raises:
        PlainDataError: a value of another type (or an object array) is in the tree.
    """
    reg = {c: c.__qualname__ for c in classes}
    arrays: list[np.ndarray] = []
    tree = _encode(obj, arrays, reg)
    buf = io.BytesIO()
    members = {f"arr{i}": a for i, a in enumerate(arrays)}
    members[_TREE] = np.frombuffer(json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **members)
    return MAGIC + buf.getvalue()


def loads(blob: bytes, classes: Iterable[type] = ()) -> Any:
    """Read a blob written by :func:`dumps`, rebuilding objects only of ``classes``.

    Never runs code from the blob: arrays load with ``allow_pickle=False`` and objects are
    rebuilt attribute by attribute.

    Raises:
        PlainDataError: the blob is not plain data (e.g. a pickle), is truncated, or names a
            class outside ``classes``.
    """
    blob = bytes(blob)
    if not blob.startswith(MAGIC):
        raise PlainDataError("not a reverie plain-data blob (a pickle or another format); it is not read")
    reg = {c.__qualname__: c for c in classes}
    try:
        with np.load(io.BytesIO(blob[len(MAGIC):]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise PlainDataError(f"unreadable plain-data blob: {type(e).__name__}: {e}") from None
    if _TREE not in arrays:
        raise PlainDataError("plain-data blob without its JSON tree")
    try:
        tree = json.loads(arrays.pop(_TREE).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PlainDataError(f"plain-data blob with an unreadable JSON tree: {e}") from None
    return _decode(tree, arrays, reg)
