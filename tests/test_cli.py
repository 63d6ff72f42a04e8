"""The reverie CLI: --help everywhere, targets, config show, clean errors."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from reverie.pipeline.cli import app
from tests.conftest import DEMO_CONFIG

runner = CliRunner()


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + (name,))

    walk(group, prefix)
    return out


def test_help_on_every_command():
    cmds = _commands(app)
    assert ("targets",) in cmds and ("config", "show") in cmds
    for path in cmds:
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "Usage" in r.output


def test_targets_prints_demo_latents(tmp_path):
    args = ["targets", "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path), "--record"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "blocks.1.hook_resid_pre" in r.output and "jumprelu" in r.output and "tinystories-656k" in r.output
    lines = [l for l in r.output.splitlines() if re.match(r"^\s+\d+\s+-\d+\.\d+\s+\d", l)]
    assert len(lines) == 8
    again = runner.invoke(app, args)
    assert [l for l in again.output.splitlines() if re.match(r"^\s+\d+\s+-\d+\.\d+\s+\d", l)] == lines
    from reverie.pipeline.store import Store

    with Store(tmp_path) as s:
        assert s.fetch_one("SELECT count(*) AS n FROM targets")["n"] == 18  # two runs × (8 random + 1 combination)
        assert s.fetch_one("SELECT count(DISTINCT run_id) AS n FROM runs WHERE status = 'done'")["n"] == 2


def test_config_show_applies_overrides():
    r = runner.invoke(app, ["config", "show", "--config", str(DEMO_CONFIG), "--set", "dream.iterations=42"])
    assert r.exit_code == 0, r.output
    assert "iterations = 42" in r.output and "[scan.corpus]" in r.output


def test_bad_latent_is_a_clean_error(tmp_path):
    r = runner.invoke(app, ["targets", "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path), "--latent", "99999"])
    assert r.exit_code == 2
    assert "do not exist" in r.output and "Traceback" not in r.output


def test_unknown_config_key_is_a_clean_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[targets]\nnrandom = 3\n")
    r = runner.invoke(app, ["config", "show", "--config", str(p)])
    assert r.exit_code == 2 and "unknown key 'nrandom' in section [targets]" in r.output


def test_debug_keeps_the_exception_chain_and_plain_errors_stay_one_line(monkeypatch):
    """A ReverieError raised `from None` over a library error: one line without --debug; with
    --debug the full traceback, the hidden cause included."""
    import reverie.pipeline.cli_project as cli  # config show lives there
    from reverie.pipeline.errors import ConfigError

    def broken(*a, **k):
        try:
            raise ValueError("the root cause xyzzy")
        except ValueError:
            raise ConfigError("a clean message") from None

    monkeypatch.setattr(cli, "dump_toml", broken)
    monkeypatch.delenv("REVERIE_DEBUG", raising=False)
    r = runner.invoke(app, ["config", "show", "--config", str(DEMO_CONFIG)])
    assert r.exit_code == 2 and r.output.strip() == "error: a clean message"
    r = runner.invoke(app, ["--debug", "config", "show", "--config", str(DEMO_CONFIG)])
    assert r.exit_code == 2 and "Traceback" in r.output and "ValueError: the root cause xyzzy" in r.output
    assert "ConfigError: a clean message" in r.output and "error: a clean message" in r.output


def test_renamed_flags_and_their_deprecated_spellings(tmp_path, monkeypatch):
    """--n-random (was --n) and --explainer-model (was --model): the old spellings still work,
    hidden from --help, with a one-line note; both spellings with different values is an error."""
    import reverie.stages.explain as explain_pkg

    base = ["targets", "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path)]
    new = runner.invoke(app, [*base, "--n-random", "2"])
    assert new.exit_code == 0 and "deprecated" not in new.output, new.output
    old = runner.invoke(app, [*base, "--n", "2"])
    assert old.exit_code == 0, old.output
    assert "note: --n is deprecated; use --n-random" in old.output
    assert old.output.replace("note: --n is deprecated; use --n-random\n", "") == new.output
    both = runner.invoke(app, [*base, "--n", "2", "--n-random", "3"])
    assert both.exit_code == 2 and "--n and --n-random disagree" in both.output
    for cmd in ("targets", "scan", "nightly"):
        h = runner.invoke(app, [cmd, "--help"]).output
        assert "--n-random" in h and not re.search(r"--n\b(?!-)", h), cmd
    h = runner.invoke(app, ["explain", "--help"]).output
    assert "--explainer-model" in h and not re.search(r"--model\b", h)

    seen = {}

    def fake_available(cfg):
        seen["model"] = cfg.explain.model
        return False, "no key"

    monkeypatch.setattr(explain_pkg, "explain_available", fake_available)
    args = ["explain", "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path)]
    r = runner.invoke(app, [*args, "--model", "old-name"])
    assert r.exit_code == 0 and seen["model"] == "old-name", r.output
    assert "note: --model is deprecated; use --explainer-model" in r.output
    r = runner.invoke(app, [*args, "--explainer-model", "new-name"])
    assert r.exit_code == 0 and seen["model"] == "new-name" and "deprecated" not in r.output, r.output
