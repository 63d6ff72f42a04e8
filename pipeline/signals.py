"""SIGINT / SIGTERM: stop at the next safe point, record the run ``interrupted``, exit 130 / 143.

One mechanism for every command (issues 11 and 16):

* :func:`handle_signals` installs handlers for SIGINT and SIGTERM (main thread only; the previous
  handlers come back on exit). The first signal only sets a flag; a second signal of either kind
  raises :class:`~pipeline.errors.Interrupted` at once ("press Ctrl-C again to stop now").
* :func:`check_interrupt` raises :class:`~pipeline.errors.Interrupted` if a signal arrived. It is
  called at the safe points: before every unit of a batch (``UnitLedger.run``) and once per EPO
  iteration by the dream engine, so a dream stops between iterations.
* Inside :func:`interruptible` (work that commits its own progress transactionally, e.g. the scan
  with its checkpoints, or a whole CLI command whose writes are each one transaction) the first
  signal raises at once: an interrupted DuckDB transaction rolls back, so nothing partial is kept.
* :func:`is_interrupt` tells whether an exception is really an interruption (``Interrupted``,
  ``KeyboardInterrupt``, or DuckDB's ``RuntimeError("Query interrupted")`` while a signal is
  pending); unit runners re-raise those instead of recording a unit failure.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from reverie.pipeline.errors import Interrupted

log = logging.getLogger("reverie.signals")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None     # signal number of the first signal received, None if none
_count = 0                      # signals received since the flag was last cleared
_immediate = 0                  # depth of interruptible() sections


def pending() -> int | None:
    """The signal number received since the last :func:`clear`, or None."""
    return _pending


def clear() -> None:
    """Forget any received signal (a new command starts with a clean flag)."""
    global _pending, _count
    _pending, _count = None, 0


def check_interrupt() -> None:
    """Raise :class:`~pipeline.errors.Interrupted` if SIGINT or SIGTERM arrived; else return at once.

    Cheap (one global read): call it at every safe point, e.g. once per EPO iteration.

    Raises:
        Interrupted: a signal arrived; ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM).
    """
    if _pending is not None:
        raise Interrupted(_pending)


def request_stop(signum: int) -> None:
    """What the handler does (also callable from tests): set the flag; raise at once if inside
    :func:`interruptible` or if this is the second signal.

    Raises:
        Interrupted: see above.
    """
    global _pending, _count
    _count += 1
    if _pending is None:
        _pending = int(signum)
    if _immediate > 0 or _count > 1:
        raise Interrupted(_pending)
    log.warning("received %s: stopping at the next safe point (send it again to stop now)", signal.Signals(signum).name)


def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    request_stop(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the duration of the block (a no-op outside the
    main thread, where Python cannot install handlers). Clears the flag on entry."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block a signal raises :class:`~pipeline.errors.Interrupted` immediately (for
    work whose writes are transactional, so stopping anywhere loses only uncommitted work).
    A signal that arrived before the block raises on entry."""
    global _immediate
    check_interrupt()
    _immediate += 1
    try:
        yield
    finally:
        _immediate -= 1


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is an interruption rather than a failure: :class:`Interrupted`,
    ``KeyboardInterrupt``, or any exception raised while a signal is pending (DuckDB turns a
    signal that arrives mid-query into ``RuntimeError("Query interrupted")``)."""
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return True
    return _pending is not None or "Query interrupted" in str(exc)


def as_interrupted(exc: BaseException) -> Interrupted:
    """The :class:`Interrupted` to raise for an interruption ``exc`` (SIGINT for a bare ``KeyboardInterrupt``)."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(_pending if _pending is not None else signal.SIGINT)
