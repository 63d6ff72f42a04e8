"""Readable token pieces: the one place that turns token ids into display strings.

Decoding one id at a time with ``tokenizer.decode([id])`` loses information: SentencePiece-style
decoders strip a leading space ('▁') from every "sequence" of one token, so words run together
("stick" + "▁and" → "stickand"), and byte-level / byte-fallback tokens that hold part of a UTF-8
character decode to "�". :func:`token_pieces` instead reads each token's own bytes from the
vocabulary (GPT-2 byte-level tokens, '▁'-for-space pieces, ``<0xNN>`` byte-fallback tokens) and
renders them with the **display convention** of :func:`display_text`:

* spaces are real spaces (a token that starts with a space is shown with its leading space);
* a backslash is shown as ``\\\\``; newline, carriage return and tab as ``\\n``, ``\\r``, ``\\t``;
  any other non-printable character as ``\\uXXXX`` (``\\UXXXXXXXX`` above U+FFFF);
* bytes that are not (a complete piece of) valid UTF-8 inside one token — part of a character
  split across tokens, or a lone byte-fallback token such as ``<0x0A>`` … ``<0xE6>`` — as
  ``\\xNN``. (A byte-fallback token that is a whole character, e.g. ``<0x0A>``, is that
  character: ``\\n``.)

The convention is reversible: :func:`from_display` maps a display string back to the text, so
``from_display("".join(token_pieces(tok, ids))) == tok.decode(ids)`` for real text (tested on
the demo and GPT-2 tokenizers). The one intended difference: decoders that strip the leading
space of a whole sequence (SentencePiece's ``Strip``) drop it from ``decode``; the pieces keep
it, because the model saw that token.

Special and added tokens (BOS, ``<unk>``, ``<|endoftext|>``) are shown as their token string.
Tokenizers of other kinds (WordPiece, slow tokenizers) fall back to ``decode([id])`` per token,
rendered with the same convention.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Sequence

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_DISPLAY_RE = re.compile(r"\\(\\|n|r|t|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


# ----------------------------------------------------------------------------- display convention


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if ch == " " or ch.isprintable():
        return ch
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def display_text(text: str, keep_newlines: bool = False) -> str:
    """Text in the display convention (see the module docstring): one printable line.

    This is the one escaping helper for anything untrusted shown on a terminal (token pieces,
    dream prompts, dataset examples, LLM explanations, error messages, log lines): ESC, BEL and
    every other control or invisible character comes out as a visible escape, so no byte
    sequence from a corpus, a model or an LLM proxy can drive the operator's terminal.

    Args:
        text: any string (lone surrogates U+DC80–U+DCFF stand for undecodable bytes and are
            shown as ``\\xNN``).
        keep_newlines: keep ``\\n`` as a real line break (multi-line messages); everything
            else is escaped as usual.
    Returns:
        The display string; :func:`from_display` inverts it (with ``keep_newlines=False``).
    """
    if keep_newlines:
        return "\n".join(display_text(line) for line in str(text).split("\n"))
    return "".join(_escape_char(ch) for ch in text)


def display_bytes(data: bytes) -> str:
    """Bytes in the display convention: valid UTF-8 as text, other bytes as ``\\xNN``."""
    return display_text(data.decode("utf-8", errors="surrogateescape"))


def from_display(display: str) -> str:
    """Invert the display convention: the text a display string (or concatenated pieces) stands for.

    ``\\xNN`` escapes become bytes and the whole is decoded as UTF-8, so a character split over
    several pieces comes back whole; bytes that still form no valid character become U+FFFD, as
    ``tokenizer.decode`` does.
    """
    out = bytearray()
    pos = 0
    for m in _DISPLAY_RE.finditer(display):
        out += display[pos:m.start()].encode("utf-8", errors="surrogatepass")
        e = m.group(1)
        if e == "\\":
            out += b"\\"
        elif e in ("n", "r", "t"):
            out += {"n": b"\n", "r": b"\r", "t": b"\t"}[e]
        elif e[0] == "x":
            out.append(int(e[1:], 16))
        else:
            out += chr(int(e[1:], 16)).encode("utf-8", errors="surrogatepass")
        pos = m.end()
    out += display[pos:].encode("utf-8", errors="surrogatepass")
    return out.decode("utf-8", errors="replace")


def visible(piece: str) -> str:
    """Make a token string safe for one-line display without re-escaping a display piece:
    raw newline, carriage return, tab and other control characters are escaped; backslashes are
    left alone (so pieces from :func:`token_pieces` pass through unchanged, and raw token strings
    stored by older versions still show their newlines as ``\\n``)."""
    return "".join(ch if ch == "\\" else _escape_char(ch) for ch in piece)


# ----------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted: character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _bytes_to_unicode()


def _decoder_types(tokenizer: Any) -> tuple[set[str], str | None]:
    """Types of the fast tokenizer's decoder (flattened Sequence) and the Metaspace/Replace
    character that stands for a space ('▁'), if any."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set(), None
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - an unserializable tokenizer: fall back to decode()
        return set(), None
    types: set[str] = set()
    space: str | None = None
    stack = [dec]
    while stack:
        d = stack.pop()
        if not isinstance(d, dict):
            continue
        t = d.get("type")
        types.add(t)
        if t == "Sequence":
            stack.extend(d.get("decoders") or [])
        elif t == "Metaspace":
            space = d.get("replacement") or "▁"
        elif t == "Replace" and (d.get("content") == " "):
            pat = d.get("pattern") or {}
            space = pat.get("String") or space
    return types, space


class _Renderer:
    """Per-tokenizer cache of display pieces by id."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        types, self.space = _decoder_types(tokenizer)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.metaspace = self.space is not None
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added = {int(i) for i in added}
        self.cache: dict[int, str] = {}

    def piece(self, i: int) -> str:
        if i in self.cache:
            return self.cache[i]
        tok = self.tok
        s = tok.convert_ids_to_tokens(int(i)) if (self.byte_level or self.metaspace) else None
        if s is None:  # other tokenizer kinds, or an id without a token string
            out = display_text(tok.decode([int(i)]))
        elif i in self.added:
            out = display_text(s)
        elif self.byte_level:
            try:
                out = display_bytes(bytes(_BYTE_DECODER[c] for c in s))
            except KeyError:  # not a byte-level string (e.g. an added token not flagged as such)
                out = display_text(s)
        else:
            m = _BYTE_TOKEN.match(s) if self.byte_fallback else None
            out = display_bytes(bytes([int(m.group(1), 16)])) if m else display_text(s.replace(self.space, " "))
        self.cache[i] = out
        return out


@lru_cache(maxsize=16)
def _cached_renderer(tokenizer: Any) -> _Renderer:
    return _Renderer(tokenizer)


def _renderer(tokenizer: Any) -> _Renderer:
    try:
        return _cached_renderer(tokenizer)
    except TypeError:  # an unhashable tokenizer: no cache across calls
        return _Renderer(tokenizer)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display pieces of token ids: one string per id, in the display convention (module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers get exact per-token bytes; others
            fall back to ``decode([id])`` per id).
        ids: token ids (ints, any sequence; numpy/torch integers are accepted).
    Returns:
        ``len(ids)`` strings whose concatenation, read back with :func:`from_display`, is the
        decoded text (leading space kept; see the module docstring).
    """
    r = _renderer(tokenizer)
    return [r.piece(int(i)) for i in ids]


def truncate_start(text: str, width: int) -> str:
    """Keep the END of ``text`` (where a dream's objective is read) within ``width`` characters,
    marking a cut with a leading '…'. ``width`` ≥ 2."""
    return text if len(text) <= width else "…" + text[len(text) - (width - 1):]
