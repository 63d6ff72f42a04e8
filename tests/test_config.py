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
    with pytest.raises(ConfigError, match="sae.path"):
        load_config(p)  # path still has its default
    cfg = load_config(p, {"sae.path": ""})
    assert cfg.sae.identity == "gpt2-small-res-jb/blocks.6.hook_resid_pre"


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
