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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
