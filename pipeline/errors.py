"""Errors reverie raises on bad input. Each message says what was wrong and how to fix it."""

from __future__ import annotations


class ReverieError(Exception):
    """Base class: a user-facing error. The CLI prints its message without a traceback and exits
    with :attr:`exit_code` (2: a bad input or configuration)."""

    exit_code = 2


class ConfigError(ReverieError):
    """The configuration file, a flag or an environment variable is wrong."""


class LoadError(ReverieError):
    """A model, SAE, tokenizer or corpus could not be loaded (missing, corrupt, offline)."""


class TargetError(ReverieError):
    """A latent or hook point does not fit the SAE or the model."""


class StoreWriteError(ReverieError):
    """The project database (or a file beside it) could not be written: disk full, read-only
    filesystem or file, a database invalidated by an earlier write failure. Fatal for the run:
    unit runners re-raise it instead of recording a unit failure (that write would fail too).
    Everything committed before it is kept; a rerun resumes. Exit code 1 (the run failed; the
    input was fine)."""

    exit_code = 1


class OfflineError(LoadError):
    """A hub resource was requested while the hub is unreachable (e.g. ``HF_HUB_OFFLINE=1``)."""


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM and stopped at a safe point.

    A ``BaseException`` (like ``KeyboardInterrupt``), so the ``except Exception`` handlers that keep
    one failing unit from stopping a batch never swallow it. Raised by
    :func:`pipeline.signals.check_interrupt`.

    Attributes:
        signum: the signal number (``signal.SIGINT`` = 2, ``signal.SIGTERM`` = 15).
    """

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        try:
            self.signame = signal.Signals(self.signum).name
        except ValueError:
            self.signame = f"signal {self.signum}"
        super().__init__(f"interrupted by {self.signame}")

    @property
    def exit_code(self) -> int:
        """The shell convention 128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum
