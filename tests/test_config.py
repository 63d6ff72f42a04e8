"""Configuration: validation, unknown keys, overrides, the shared-folder variable."""

from __future__ import annotations

import pytest

from reverie.pipeline.config import ReverieConfig, dump_toml, load_config
from reverie.pipeline.errors import ConfigError
from tests.conftest import DEMO_CONFIG


def test_demo_config_points_at_shared(shared):
    cfg = load_config(DEMO_CONFIG)
    assert cfg.model.path == "{shared}/models/tinystories-656k"
    assert cfg.targets.n_random == 8
    from reverie.pipeline.paths import expand

    assert expand(cfg.sae.path).startswith(str(shared))


def test_unknown_key_names_key_and_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dream]\niterations = 5\nitrations = 7\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'itrations'" in msg and "[dream]" in msg


def test_unknown_nested_key_and_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[scan.corpus]\npaht = "x.jsonl"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'paht' in section \[scan.corpus\]"):
        load_config(p)


def test_unknown_top_level_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dreams]\niterations = 5\n')
    with pytest.raises(ConfigError, match="unknown key 'dreams'"):
        load_config(p)


def test_bad_value_type(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dream]\niterations = "many"\n')
    with pytest.raises(ConfigError, match="dream.iterations"):
        load_config(p)


def test_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dream\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_overrides_win_over_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dream]\niterations = 5\n[targets]\nseed = 3\n')
    cfg = load_config(p, {"dream.iterations": 7, "targets.seed": None})
    assert cfg.dream.iterations == 7  # flag wins
    assert cfg.targets.seed == 3  # None override = not given


def test_mutually_exclusive_sources(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[sae]\nrelease = "gpt2-small-res-jb"\nsae_id = "blocks.6.hook_resid_pre"\n')
    cfg = load_config(p)  # no default path to clash with
    assert cfg.sae.identity == "gpt2-small-res-jb/blocks.6.hook_resid_pre"
    with pytest.raises(ConfigError, match="sae.path"):
        load_config(p, {"sae.path": "/some/sae"})
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, {"model.name": "gpt2", "model.path": "/some/model"})
    with pytest.raises(ConfigError, match="scan.corpus|corpus.hf_dataset"):
        load_config(None, {"scan.corpus.hf_dataset": "x/y", "scan.corpus.path": "/some/corpus"})
    with pytest.raises(ConfigError, match="sae.sae_id"):
        load_config(None, {"sae.release": "gpt2-small-res-jb"})


MINIMAL = '[model]\nname = "gpt2"\n\n[sae]\nrelease = "gpt2-small-res-jb"\nsae_id = "blocks.8.hook_resid_pre"\n'


def test_minimal_config_validates_and_names_what_is_missing(tmp_path):
    """Defaults hold no demo paths: a file with only the model and the SAE validates; what a
    command still needs (project.dir, a corpus) is one clear error each, where it is used."""
    from typer.testing import CliRunner

    from reverie.pipeline.cli import app

    p = tmp_path / "minimal.toml"
    p.write_text(MINIMAL)
    cfg = load_config(p)
    assert cfg.model.name == "gpt2" and cfg.model.path is None and cfg.sae.path is None
    assert cfg.project.dir is None and cfg.scan.corpus.path is None and cfg.scan.corpus.hf_dataset is None
    assert cfg.require("model", "sae") is cfg
    with pytest.raises(ConfigError, match=r"set scan\.corpus\.path or scan\.corpus\.hf_dataset"):
        cfg.scan.corpus.require()
    with pytest.raises(ConfigError, match=r"set project\.dir"):
        cfg.project.path
    with pytest.raises(ConfigError) as e:
        cfg.require("project", "model", "sae", "corpus")
    assert "project.dir" in str(e.value) and "scan.corpus.path" in str(e.value) and "model.name" not in str(e.value)
    r = CliRunner().invoke(app, ["config", "show", "--config", str(p)])
    assert r.exit_code == 0, r.output
    assert 'name = "gpt2"' in r.output and "tinystories" not in r.output and "runs/demo" not in r.output
    r = CliRunner().invoke(app, ["scan", "--config", str(p)])  # fails before anything loads
    assert r.exit_code == 2 and "set project.dir" in r.output and "set scan.corpus.path" in r.output and "Traceback" not in r.output


def test_defaults_hold_no_demo_paths():
    cfg = load_config(None)
    text = dump_toml(cfg)
    assert "{shared}" not in text and "runs/demo" not in text
    assert cfg.model.missing() and cfg.sae.missing() and cfg.scan.corpus.missing() and cfg.project.missing()


def test_corpus_and_model_uses_name_the_missing_setting():
    from reverie.pipeline.corpus import corpus_identity, iter_documents
    from reverie.sae_targets.loading import load_model, load_subject

    cfg = load_config(None)
    with pytest.raises(ConfigError, match="scan.corpus.path or scan.corpus.hf_dataset"):
        corpus_identity(cfg.scan.corpus)
    with pytest.raises(ConfigError, match="scan.corpus.path or scan.corpus.hf_dataset"):
        next(iter_documents(cfg.scan.corpus))
    with pytest.raises(ConfigError, match="set model.name or model.path"):
        load_model(cfg.model)
    with pytest.raises(ConfigError, match="no model configured.*no SAE configured"):
        load_subject(cfg.model, cfg.sae)


def test_every_field_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, ReverieConfig.__mro__[1]):
                walk(ann)

    for name, field in ReverieConfig.model_fields.items():
        walk(field.annotation)


@pytest.mark.parametrize("prefix", ["Once upon a time", "emoji 😀 and a \"quote\" and a \\ backslash\n"])
def test_dump_toml_round_trips(tmp_path, prefix):
    cfg = load_config(DEMO_CONFIG, {"dream.iterations": 11, "targets.latents": [1, 2], "dream.prefix": prefix})
    p = tmp_path / "round.toml"
    p.write_text(dump_toml(cfg))
    again = load_config(p)
    assert again.to_toml_dict() == cfg.to_toml_dict()


def test_missing_shared_names_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("REVERIE_SHARED", str(tmp_path / "nowhere"))
    from reverie.pipeline.paths import expand

    with pytest.raises(ConfigError) as e:
        expand("{shared}/models/x")
    assert "REVERIE_SHARED" in str(e.value) and "nowhere" in str(e.value)


def test_shared_env_override(monkeypatch, shared):
    monkeypatch.setenv("REVERIE_SHARED", str(shared))
    from reverie.pipeline.paths import shared_dir

    assert shared_dir() == shared.resolve()


def test_production_config_validates():
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "nightly.toml")
    assert cfg.model.name == "gpt2-small" and cfg.model.path is None
    assert cfg.sae.release == "gpt2-small-res-jb" and cfg.sae.path is None
    assert cfg.scan.corpus.hf_dataset == "monology/pile-uncopyrighted" and cfg.scan.corpus.path is None
    assert cfg.targets.seed is None  # the date
    assert cfg.require("project", "model", "sae", "corpus") is cfg  # it says everything a nightly needs


def test_demo_config_says_everything_it_needs():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.require("project", "model", "sae", "corpus") is cfg
