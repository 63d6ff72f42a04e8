"""Shared plumbing of the ``reverie`` command line (:mod:`pipeline.cli`): the Typer ``app`` and its
``--debug`` callback, the common options, config building (``--config``, ``--set``, flags),
error handling and safe points (:func:`handle_errors`), exception-chain printing, terminal
logging, target prechecks, run-id checks, the skipped-units lines, the ``--local`` LLM wrapper
(:func:`with_local_llm`) and the failed/interrupted run recorder (:func:`_recorded_run`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer

from reverie.pipeline.config import ReverieConfig, load_config
from reverie.pipeline.errors import Interrupted, ReverieError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="reverie: explain SAE latents by dreaming (EPO) and comparing dreams with dataset examples.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")

_DEBUG = {"on": False}


def debug_enabled() -> bool:
    """Whether tracebacks are shown: ``reverie --debug ...`` or ``REVERIE_DEBUG=1``."""
    import os

    return _DEBUG["on"] or os.environ.get("REVERIE_DEBUG", "") not in ("", "0")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (terminal); by default one line per error.")) -> None:
    """reverie: explain SAE latents by dreaming (EPO) and comparing dreams with dataset examples."""
    _DEBUG["on"] = debug


def safe_text(text: Any) -> str:
    """``text`` safe for the terminal (:func:`sae_targets.tokens.display_text`, line breaks kept)."""
    from reverie.sae_targets.tokens import display_text

    return display_text(str(text), keep_newlines=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (default: built-in defaults, which name no project, model, SAE or corpus; the demo is configs/demo.toml).", exists=False)
SetOpt = typer.Option(None, "--set", help="Override a config value: --set dream.iterations=50 (repeatable; value parsed as TOML, else string).")
DeviceOpt = typer.Option(None, "--device", help="Override model.device (cpu, cuda, ...).")
ProjectOpt = typer.Option(None, "--project-dir", help="Override project.dir (where reverie.duckdb lives).")
NOldOpt = typer.Option(None, "--n", hidden=True, help="Deprecated spelling of --n-random.")


def deprecated_alias(value: Any, old_value: Any, old: str, new: str) -> Any:
    """Merge a flag's deprecated spelling into its new one: the old spelling still works and
    prints a one-line note to stderr.

    Raises:
        ReverieError: both spellings are given with different values (exit code 2).
    """
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise ReverieError(f"{old} and {new} disagree ({old_value!r} vs {value!r}); {old} is the deprecated spelling of {new}: give only {new}")
    typer.secho(f"note: {old} is deprecated; use {new}", fg=typer.colors.YELLOW, err=True)
    return old_value


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c.d=x"]`` → ``{"a.b": 1, "c.d": "x"}`` (values parsed as TOML when possible)."""
    import tomllib

    out: dict[str, Any] = {}
    for s in sets or []:
        if "=" not in s:
            raise ReverieError(f"--set {s!r}: expected key=value, e.g. --set dream.iterations=50")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def build_config(config: Optional[Path], sets: list[str] | None, **flags: Any) -> ReverieConfig:
    """Load the config file and apply ``--set`` values, then explicit flags (flags win); then
    apply ``run.torch_threads`` to torch (:func:`pipeline.runtime.apply_torch_threads`), so every
    command runs its tensor work on the configured threads.

    Raises:
        ConfigError: see :func:`pipeline.config.load_config`.
    """
    from reverie.pipeline.runtime import apply_torch_threads

    overrides = parse_sets(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = load_config(config, overrides)
    apply_torch_threads(cfg.run)
    return cfg


def safe_points(fn: Callable) -> Callable:
    """Mark a command that checks :func:`pipeline.signals.check_interrupt` at its own safe points
    (the nightly: between units and EPO iterations), so a first signal only sets the stop flag.
    Other commands stop at once on a signal (their writes are transactional)."""
    fn._reverie_safe_points = True  # type: ignore[attr-defined]
    return fn


def handle_errors(fn: Callable) -> Callable:
    """Run a command with the SIGINT/SIGTERM handlers installed (:func:`pipeline.signals.handle_signals`;
    interruptible at once unless marked with :func:`safe_points`); turn a ReverieError into a
    one-line message and its exit code (2 for bad input, 1 when the database cannot be written),
    any other exception into one line and exit code 1 (the traceback with ``--debug``), and an
    interruption into one line and exit code 130 (SIGINT) / 143 (SIGTERM). Messages are escaped
    (:func:`safe_text`)."""
    own_safe_points = getattr(fn, "_reverie_safe_points", False)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from reverie.pipeline.signals import as_interrupted, handle_signals, interruptible

        setup_logging(level=logging.WARNING)
        try:
            with handle_signals(), (contextlib.nullcontext() if own_safe_points else interruptible()):
                return fn(*args, **kwargs)
        except ReverieError as e:
            if debug_enabled():
                print_debug_traceback(e)
            typer.secho(f"error: {safe_text(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except (Interrupted, KeyboardInterrupt) as e:
            i = as_interrupted(e)
            typer.secho(f"stopped: {i}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(i.exit_code) from None
        except (typer.Exit, typer.Abort, SystemExit, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - one line unless --debug
            if debug_enabled():
                show_whole_chain(e)
                raise  # Python prints the traceback, exit code 1
            typer.secho(f"error: {safe_text(f'{type(e).__name__}: {e}')} (an unexpected error: rerun with `reverie --debug ...` "
                        "for the traceback)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


def show_whole_chain(e: BaseException) -> BaseException:
    """Un-hide the causes of ``e`` for ``--debug``: an error raised ``from None`` (which keeps
    the one-line messages free of library detail) still holds its cause in ``__context__``;
    clearing ``__suppress_context__`` along the chain makes a printed traceback show it. Returns ``e``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__suppress_context__ = False
        cur = cur.__cause__ or cur.__context__
    return e


def print_debug_traceback(e: BaseException, file: Any = None) -> None:
    """Print ``e``'s full traceback with its whole exception chain (:func:`show_whole_chain`) to
    ``file`` (default: stderr), for ``--debug``."""
    import traceback

    traceback.print_exception(show_whole_chain(e), file=file or sys.stderr)


class _TerminalFilter(logging.Filter):
    """What reaches the terminal: reverie's own loggers at INFO and above, other named loggers
    at WARNING and above, never the root logger (libraries' bare ``logging.info(...)`` calls such
    as transformer_lens's "Moving model to device"). Everything still goes to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root":
            return False
        return record.name.startswith("reverie") or record.levelno >= logging.WARNING


class _TerminalFormatter(logging.Formatter):
    """One line per record: no traceback on the terminal (the log file has it)."""

    def format(self, record: logging.LogRecord) -> str:
        if debug_enabled():
            return safe_text(super().format(record))
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return safe_text(super().format(record))  # log lines carry untrusted text (file names, LLM errors)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def setup_logging(verbose: bool = False, level: int = logging.INFO) -> None:
    """Terminal logging: one stderr handler with :class:`_TerminalFilter` at ``level`` (every
    command starts with WARNING; long commands call this again with INFO; ``verbose``: DEBUG).
    The root logger's level is at most INFO so a run's log file (attached by the nightly)
    receives every INFO record."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_reverie_terminal", False):
            root.removeHandler(h)
    h = _StderrHandler()
    h._reverie_terminal = True  # type: ignore[attr-defined]
    h.setLevel(logging.DEBUG if verbose else level)
    h.addFilter(_TerminalFilter())
    h.setFormatter(_TerminalFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    logging.raiseExceptions = debug_enabled()  # a log write that fails (disk full) prints no traceback
    want = logging.DEBUG if verbose else logging.INFO
    if root.level == logging.NOTSET or root.level > want:
        root.setLevel(want)



def precheck(cfg: ReverieConfig) -> None:
    """Check the configured targets against the SAE's cfg.json before the model loads (seconds
    earlier than the load would find out): ids within ``d_sae``, no repeated latent in a
    combination, something to explain (:func:`sae_targets.loading.precheck_targets`).

    Raises:
        TargetError, LoadError: see there (exit code 2).
    """
    from reverie.sae_targets.loading import precheck_targets

    precheck_targets(cfg.targets.latents, cfg.targets.combinations, cfg.sae, n_random=cfg.targets.n_random)


def check_run_option(run: str | None) -> str | None:
    """A ``--run`` / ``--run-id`` value checked for use in paths (:func:`pipeline.paths.check_run_id`); None passes."""
    from reverie.pipeline.paths import check_run_id

    return None if run is None else check_run_id(run)


def skipped_lines(skipped: dict[str, list[str]], max_ids: int = 8) -> list[str]:
    """One line per stage of a resumed run's skipped (already done) units, e.g.
    ``skipped dream: 3 targets already done (85, 35, 35+85)``; ``'*'`` marks a run-level unit."""
    out = []
    for stage, ids in skipped.items():
        if ids == ["*"]:
            out.append(f"skipped {stage}: already done" + (", inputs unchanged (not rendered again)" if stage == "report" else ""))
            continue
        names = [i for i in ids if i != "*"]
        shown = ", ".join(names[:max_ids]) + (f", … {len(names) - max_ids} more" if len(names) > max_ids else "")
        out.append(f"skipped {stage}: {len(names)} target{'s' if len(names) != 1 else ''} already done ({shown})")
    return out


def with_local_llm(fn: Callable) -> Callable:
    """For ``reverie explain --local``: when the command's ``local`` flag is set, start the local
    LLM server (:func:`stages.explain.local.local_llm`: llama-cpp-python with SmolLM2-135M, the
    ``local-llm`` extra; ``run.torch_threads`` threads, else every CPU) for the command's duration
    and point the ``[explain]`` section at it through the command's ``--set`` values, the one way
    every endpoint is configured (its defaults first, the user's ``--set`` values, then its URL,
    model and key variable); stop the server when the command ends, whatever happens.

    Raises:
        ReverieError: ``--local`` with ``--base-url`` or a model flag.
        LocalLLMError: the extra is missing, or the server did not start (its output's tail).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("local"):
            return fn(*args, **kwargs)
        from reverie.stages.explain.local import key_in_env, local_llm, local_overrides

        if any(kwargs.get(k) for k in ("base_url", "model", "model_old", "explainer_model")):  # model_old: the deprecated --model
            raise ReverieError("--local starts its own server and model: drop --base-url and the model flag")
        user = list(kwargs.get("set_") or [])
        threads = build_config(kwargs.get("config"), user).run.torch_threads
        with local_llm(n_threads=threads) as server, key_in_env(server):
            typer.echo(safe_text(f"local LLM: {server.model} at {server.base_url} (pid {server.pid}; stopped when this command ends)"))
            defaults, forced = local_overrides(server)
            as_sets = lambda d: [f"{k}={json.dumps(v)}" for k, v in d.items()]  # noqa: E731 - JSON scalars are TOML
            out = fn(*args, **{**kwargs, "set_": as_sets(defaults) + user + as_sets(forced)})
        typer.echo(f"local LLM: stopped (pid {server.pid})")
        return out

    return wrapper


@contextlib.contextmanager
def _recorded_run(store: Any, run_id: str, t0: float):
    """Record the run 'interrupted' (SIGINT/SIGTERM) or 'failed' (any error, with its message) if
    the block raises, with its wall time since ``t0``; then re-raise. The block is
    :func:`~pipeline.signals.interruptible`: its writes are transactional, so a signal stops it at once."""
    from reverie.pipeline.signals import as_interrupted, interruptible, is_interrupt

    try:
        with interruptible():
            yield
    except BaseException as e:
        interrupted = is_interrupt(e)
        status, err = ("interrupted", str(as_interrupted(e))) if interrupted else ("failed", f"{type(e).__name__}: {e}")
        try:
            store.finish_run(run_id, status, time.time() - t0, error=err)
        except Exception as e2:  # noqa: BLE001 - the original error matters more
            from reverie.pipeline.errors import StoreWriteError

            if isinstance(e, StoreWriteError) or isinstance(e2, StoreWriteError):  # the cause is reported once, by the caller
                logging.getLogger("reverie.cli").debug("could not record run %s as %s: %s", run_id, status, e2)
            else:
                logging.getLogger("reverie.cli").exception("could not record run %s as %s", run_id, status)
        if interrupted:
            raise as_interrupted(e) from None
        raise
