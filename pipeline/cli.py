"""The ``reverie`` command line (Typer). Every command takes ``--config`` and ``--set key=value``.

Commands: ``targets``, ``config show``, ``dream``, ``scan``, ``compare``, ``explain``, ``report``,
``nightly``, ``diff``, ``gc``, ``export``. A :class:`~pipeline.errors.ReverieError` prints its message (no traceback) and
exits with its code (2: bad input; 1: the database could not be written); any other error prints
one line and exits 1; ``reverie --debug <command>`` (or ``REVERIE_DEBUG=1``) shows tracebacks.
Everything printed passes through the one escaping helper,
:func:`sae_targets.tokens.display_text`. SIGINT / SIGTERM stop a command at the next safe point
(:mod:`pipeline.signals`): the run is recorded 'interrupted' and the exit code is 130 / 143.
``run.torch_threads`` is applied by :func:`pipeline.cli_common.build_config`, before any tensor work.

The command line lives in four modules; this one registers their commands on ``app`` and is the
console entry point (``reverie.pipeline.cli:app``, :func:`main`):

- :mod:`pipeline.cli_common`: ``app`` and its ``--debug`` callback, the shared options, config
  building, error handling, logging, prechecks, the ``--local`` LLM wrapper, run recording;
- :mod:`pipeline.cli_format`: :func:`dream_table`, :func:`sig`, :func:`ppl`;
- :mod:`pipeline.cli_project`: ``config show``, ``targets``, ``nightly``, ``report``, ``diff``, ``gc``, ``export``;
- :mod:`pipeline.cli_stages`: ``explain``, ``scan``, ``compare``, ``dream``.
"""

from __future__ import annotations

from reverie.pipeline import cli_project, cli_stages  # noqa: F401 - registers the commands on app, in this (--help) order
from reverie.pipeline.cli_common import app, config_app
from reverie.pipeline.cli_format import dream_table, ppl, sig

__all__ = ["app", "config_app", "dream_table", "main", "ppl", "sig"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
