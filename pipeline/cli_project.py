"""Project-level commands of the ``reverie`` command line (:mod:`pipeline.cli`): ``config show``,
``targets``, ``nightly``, ``report``, ``diff``, ``gc``, ``export``. They register on
:data:`pipeline.cli_common.app` when this module is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from reverie.pipeline.cli_common import (
    ConfigOpt,
    DeviceOpt,
    NOldOpt,
    ProjectOpt,
    SetOpt,
    app,
    build_config,
    check_run_option,
    config_app,
    deprecated_alias,
    handle_errors,
    precheck,
    safe_points,
    safe_text,
    setup_logging,
    skipped_lines,
)
from reverie.pipeline.config import dump_toml
from reverie.pipeline.errors import ReverieError


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
