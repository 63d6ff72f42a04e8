"""Shared fixtures. Hub access is switched off before anything imports huggingface_hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.toml"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder ($REVERIE_SHARED or ../shared)."""
    from reverie.pipeline.paths import shared_dir

    return shared_dir()


@pytest.fixture()
def demo_cfg(tmp_path):
    """The demo configuration with its project directory in a fresh temporary folder."""
    from reverie.pipeline.config import load_config

    return load_config(DEMO_CONFIG, {"project.dir": str(tmp_path / "project")})


@pytest.fixture(scope="session")
def subject():
    """The demo model + JumpReLU SAE (loaded once per test session; do not mutate)."""
    from reverie.pipeline.config import load_config
    from reverie.sae_targets.loading import load_subject

    cfg = load_config(DEMO_CONFIG)
    return load_subject(cfg.model, cfg.sae)


@pytest.fixture(scope="session")
def subject_standard():
    """The demo model + the standard (ReLU) SAE."""
    from reverie.pipeline.config import load_config
    from reverie.sae_targets.loading import load_subject

    cfg = load_config(DEMO_CONFIG, {"sae.path": "{shared}/saes/tinystories-656k-res/standard-1024"})
    return load_subject(cfg.model, cfg.sae)


@pytest.fixture(scope="session")
def heldout_texts(shared) -> list[str]:
    """The first 16 held-out TinyStories (real text the SAEs never saw)."""
    import json

    lines = (shared / "corpora" / "tinystories-heldout.jsonl").read_text().splitlines()
    return [json.loads(l)["text"] for l in lines[:16]]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny-model work on one torch thread (intra-op threads only add overhead,
    and stall badly on a busy 2-core machine); restores the previous count after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
