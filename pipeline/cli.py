"""The ``reverie`` command line (Typer). Every command takes ``--config`` and ``--set key=value``.

Commands: ``targets``, ``config show``, ``dream``, ``scan``, ``compare``, ``explain``, ``report``,
``nightly``. A :class:`~pipeline.errors.ReverieError` prints its message (no traceback) and
exits with code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pipeline.config import ReverieConfig, dump_toml, load_config
from pipeline.errors import ReverieError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="reverie: explain SAE latents by dreaming (EPO) and comparing dreams with dataset examples.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (default: built-in defaults = the demo).", exists=False)
SetOpt = typer.Option(None, "--set", help="Override a config value: --set dream.iterations=50 (repeatable; value parsed as TOML, else string).")
DeviceOpt = typer.Option(None, "--device", help="Override model.device (cpu, cuda, ...).")
ProjectOpt = typer.Option(None, "--project-dir", help="Override project.dir (where reverie.duckdb lives).")


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
    """Load the config file and apply ``--set`` values, then explicit flags (flags win)."""
    overrides = parse_sets(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def handle_errors(fn: Callable) -> Callable:
    """Turn ReverieError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ReverieError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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
    n: Optional[int] = typer.Option(None, "--n", help="Number of random alive latents."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random draw."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Load model and SAE, choose the latents, record them; print model, SAE, hook point and latents."""
    from pipeline.orchestrate import record_targets
    from sae_targets.loading import load_subject
    from sae_targets.selection import select_targets

    cfg = build_config(config, set_, **{"targets.latents": latent or None, "targets.n_random": n, "targets.seed": seed, "model.device": device, "project.dir": project_dir})
    subject = load_subject(cfg.model, cfg.sae)
    chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    run_id = record_targets(cfg, subject, chosen, source)
    typer.echo(f"model         {subject.model_key}  ({subject.model.cfg.n_layers} layers, d_model {subject.model.cfg.d_model}, vocab {subject.vocab_size})")
    typer.echo(f"SAE           {subject.sae_key}")
    typer.echo(f"hook point    {subject.hook_name}  (layer {subject.layer}, prepend_bos {subject.prepend_bos}, context {subject.context_size})")
    typer.echo(f"d_in / d_sae  {subject.d_in} / {subject.d_sae}   architecture {subject.architecture}")
    if subject.neuronpedia_id:
        typer.echo(f"neuronpedia   {subject.neuronpedia_id}")
    typer.echo(f"densities     from {source}")
    typer.echo(f"run           {run_id}  (stored in {cfg.project.path / 'reverie.duckdb'})")
    typer.echo(f"{'target':>12}  {'log10 density':>14}  {'density':>9}")
    for t in chosen:
        for lat, d in zip(t.latents, t.log10_density):
            label = t.target_id if lat == t.latents[0] else ""
            dens = f"{10 ** d:.4%}" if d is not None else "?"
            typer.echo(f"{label:>12}  {d:>14.3f}  {dens:>9}" + (f"   [{t.combine} of {t.target_id}]" if t.is_combination else ""))


@app.command()
@handle_errors
def nightly(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: nightly-YYYYmmdd). Rerunning an id resumes it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random latent draw (default: config, else today's date)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of random alive latents."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="EPO iterations per seed."),
    executor: Optional[str] = typer.Option(None, "--executor", help="'local' or 'ray'."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Run every stage over random latents: targets → scan → dream → compare → explain → report.

    Resumable: rerunning the same --run-id skips finished units. Exits 1 if any unit failed.
    """
    from pipeline.orchestrate import run_nightly

    setup_logging()
    cfg = build_config(config, set_, **{"targets.seed": seed, "targets.n_random": n, "dream.iterations": iterations,
                                        "run.executor": executor, "model.device": device, "project.dir": project_dir})
    s = run_nightly(cfg, run_id)
    typer.echo("")
    typer.echo(f"run {s.run_id}: {s.done} units done, {s.failed} failed, {s.skipped} skipped in {s.wall_s:.1f} s")
    if s.frac_beats is not None:
        typer.echo(f"dreaming beat the dataset maximum on {s.frac_beats:.0%} of targets"
                   + (f" ({s.frac_beats_in_dist:.0%} at in-distribution CE)" if s.frac_beats_in_dist is not None else ""))
    for note in s.notes:
        typer.echo(note)
    for f in s.failures:
        typer.secho(f"failed: {f}", fg=typer.colors.RED, err=True)
    typer.echo(f"log: {s.log_file}")
    if s.index_html:
        typer.echo(f"report: {s.index_html}")
    raise typer.Exit(s.exit_code)


@app.command()
@handle_errors
def report(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id to report (default: the latest run with targets)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: report.out, else <project dir>/reports/<run id>)."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Write a run's static HTML report (index + one page per latent, plots as PNG) and print where index.html is."""
    from pipeline.store import Store
    from reports.render import render_reports

    cfg = build_config(config, set_, **{"project.dir": project_dir})
    with Store(cfg.project.path, read_only=True) as store:
        index = render_reports(cfg, store, run, out)
    typer.echo(f"report: {index}")


@app.command()
@handle_errors
def explain(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: the latest run with targets)."),
    scan: Optional[str] = typer.Option(None, "--scan", help="Scan id holding the dataset examples (default: the run's scan)."),
    model: Optional[str] = typer.Option(None, "--model", help="Override explain.model (chat model name at the endpoint)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Override explain.base_url (an OpenAI-compatible endpoint)."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Explain each target with an LLM from dataset examples, dreams and both; detection-score them.

    Needs an API key in $OPENAI_API_KEY (or the variable named by explain.api_key_env); without
    one it prints one line and exits 0.
    """
    from pipeline.store import Store
    from stages.explain import explain_available, run_explain
    from stages.explain.stage import score_table

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
    for r in rows:
        text = r["text"] if len(r["text"]) <= 90 else r["text"][:89] + "…"
        typer.echo(f"{r['target_id']:>10}  {r['source']:<8} {ba(r['dataset_ba'], r['dataset_ba_baseline']):>17} "
                   f"{ba(r['dreams_ba'], r['dreams_ba_baseline']):>17}  {text}")
    for f in failures[:10]:
        typer.echo(f"failure  {f['target_id']:>10}  {f['what']}: {f['why'][:160]}")
    if len(failures) > 10:
        typer.echo(f"... {len(failures) - 10} more failures in table explain_failures")
    typer.echo(summary.message)


@app.command()
@handle_errors
def scan(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    latent: Optional[list[int]] = typer.Option(None, "--latent", "-l", help="Explicit latent id (repeatable); overrides random selection."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of random alive latents."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random latent draw."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Override scan.max_tokens (corpus token budget)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override scan.batch_size (contexts per forward pass)."),
    device: Optional[str] = DeviceOpt,
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Scan the corpus for the targets' max-activating examples, densities, corpus CE and random-prompt baselines.

    Reuses a finished scan with the same content key; resumes an interrupted one from its checkpoint.
    """
    from pipeline.orchestrate import record_targets
    from pipeline.store import Store
    from sae_targets.loading import load_subject
    from sae_targets.selection import select_targets
    from stages.scan import run_scan

    setup_logging()
    cfg = build_config(config, set_, **{"targets.latents": latent or None, "targets.n_random": n, "targets.seed": seed,
                                        "scan.max_tokens": max_tokens, "scan.batch_size": batch_size,
                                        "model.device": device, "project.dir": project_dir})
    subject = load_subject(cfg.model, cfg.sae)
    chosen, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    run_id = record_targets(cfg, subject, chosen, source, kind="scan")
    with Store(cfg.project.path) as store:
        try:
            scan_id = run_scan(cfg, subject, store, chosen)
        except BaseException:
            store.finish_run(run_id, "failed")
            raise
        s = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [scan_id])
        lat = store.fetch("SELECT l.latent, l.density, l.max_act, l.mean_act, max(e.window_act) AS win_act, min(e.window_ce) AS win_ce "
                          "FROM scan_latents l LEFT JOIN scan_examples e ON e.scan_id = l.scan_id AND e.latent = l.latent AND e.kind = 'top' "
                          "WHERE l.scan_id = ? GROUP BY ALL ORDER BY l.latent", [scan_id])
        store.finish_run(run_id, "done", summary={"scan_id": scan_id, "tokens_seen": s["tokens_seen"], "ce_mean": s["ce_mean"], "ce_std": s["ce_std"]})
    rate = s["tokens_seen"] / s["pass_wall_s"] if s.get("pass_wall_s") else None
    typer.echo(f"scan          {scan_id}  (run {run_id})")
    typer.echo(f"corpus        {s['tokens_seen']:,} tokens in {s['n_contexts']:,} contexts"
               + (f", corpus pass {rate:,.0f} tokens/s" if rate else ""))
    typer.echo(f"window CE     {s['ce_mean']:.2f} ± {s['ce_std']:.2f} nats/token over {s['n_ce_windows']} random {s['window_len']}-token windows after BOS"
               f"   (paper, Pile / Pythia-12B: 3.7 ± 1.1)")
    typer.echo(f"in-dist CE    ≤ {s['in_dist_threshold']:.2f} nats/token (mean + 2σ)")
    typer.echo(f"{'latent':>8} {'density':>9} {'max act':>8} {'mean act':>8} {'best window act':>15} {'min window CE':>13}")
    for r in lat:
        f = lambda v, spec=".2f": "—" if v is None else format(v, spec)  # noqa: E731
        typer.echo(f"{r['latent']:>8} {r['density']:>9.4%} {f(r['max_act']):>8} {f(r['mean_act']):>8} {f(r['win_act']):>15} {f(r['win_ce']):>13}")


@app.command()
@handle_errors
def compare(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: the latest run with dreams)."),
    scan: Optional[str] = typer.Option(None, "--scan", help="Scan id (default: the newest finished scan covering the run's latents)."),
    project_dir: Optional[str] = ProjectOpt,
) -> None:
    """Compare a run's dreams with the scan's dataset examples; store and print the table."""
    from pipeline.store import Store
    from stages.compare import format_table, latest_run_with_dreams, run_compare, scan_for_run

    cfg = build_config(config, set_, **{"project.dir": project_dir})
    with Store(cfg.project.path) as store:
        run_id = run or latest_run_with_dreams(store)
        if run_id is None:
            raise ReverieError(f"no run with dreams in {store.path}; run `reverie dream` first or pass --run")
        scan_id = scan or scan_for_run(store, run_id)
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
) -> None:
    """Dream (EPO) on latents: progress bar per seed, results stored, merged frontier printed per target."""
    from pipeline.orchestrate import record_targets
    from pipeline.store import Store
    from sae_targets.loading import check_latents, load_subject
    from sae_targets.selection import Target, log10_densities, select_targets
    from stages.dream import format_frontier, merge_results, run_dream_stage

    if combine is not None and combine not in ("lp", "sum", "min"):
        raise ReverieError(f"--combine {combine!r}: use lp, sum or min")
    if combine is not None and len(latent or []) < 2:
        raise ReverieError("--combine needs at least two --latent ids")
    cfg = build_config(config, set_, **{"targets.p": p, "dream.iterations": iterations, "model.device": device, "project.dir": project_dir,
                                        "dream.seeds": list(range(seeds)) if seeds else None, "targets.combine": combine})
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
        try:
            results = run_dream_stage(cfg, subject, store, run_id, chosen)
        except BaseException:
            store.finish_run(run_id, "failed")
            raise
        store.finish_run(run_id, "done", summary={"n_targets": len(chosen), "seeds": cfg.dream.seeds})
    for t in chosen:
        typer.echo("")
        typer.echo(format_frontier(merge_results([r for r in results if r.target_id == t.target_id])))
    typer.echo(f"\nrun {run_id} stored in {cfg.project.path / 'reverie.duckdb'}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
