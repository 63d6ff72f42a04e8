"""Latent selection: explicit ids, seeded random alive latents, density estimate fallback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from reverie.pipeline.config import load_config
from reverie.pipeline.errors import TargetError
from reverie.sae_targets.loading import load_subject
from reverie.sae_targets.selection import estimate_log10_density, random_alive_latents, select_targets
from tests.conftest import DEMO_CONFIG


def test_same_seed_same_latents(subject, demo_cfg):
    a, src = select_targets(subject, demo_cfg.targets, demo_cfg.scan.corpus)
    b, _ = select_targets(subject, demo_cfg.targets, demo_cfg.scan.corpus)
    assert src == "sparsity.safetensors"
    assert [t.latents for t in a] == [t.latents for t in b]
    assert len(a) == 9 and a[-1].target_id == "552+1300"  # 8 random + the demo combination
    cfg2 = demo_cfg.model_copy(deep=True)
    cfg2.targets.seed = 1
    c, _ = select_targets(subject, cfg2.targets, cfg2.scan.corpus)
    assert [t.latents for t in c] != [t.latents for t in a]


def test_random_latents_are_alive_and_not_dense(subject):
    dens = subject.log10_density
    ids = random_alive_latents(dens, 50, seed=7, floor=-3.0, ceiling=-1.5)
    assert len(set(ids)) == 50
    assert all(-3.0 < dens[i] < -1.5 for i in ids)


def test_too_few_alive_latents():
    dens = torch.tensor([-9.0, -2.0, -2.5, -0.5])
    with pytest.raises(TargetError, match="only 2 latents"):
        random_alive_latents(dens, 3, seed=0, floor=-4, ceiling=-1)


def test_explicit_and_combinations(subject, demo_cfg):
    demo_cfg.targets.latents = [5, 9, 5]
    demo_cfg.targets.combinations = [[5, 9]]
    ts, _ = select_targets(subject, demo_cfg.targets, demo_cfg.scan.corpus)
    assert [t.target_id for t in ts] == ["5", "9", "5+9"]
    assert ts[2].combine == "lp" and len(ts[2].log10_density) == 2
    demo_cfg.targets.latents = [4096]
    with pytest.raises(TargetError, match="do not exist"):
        select_targets(subject, demo_cfg.targets, demo_cfg.scan.corpus)


def test_density_from_corpus_scan_when_no_sparsity_file(shared, tmp_path):
    """Without sparsity.safetensors, densities come from a short scan and agree with the file."""
    dst = tmp_path / "sae"
    shutil.copytree(shared / "saes" / "tinystories-656k-res" / "standard-1024", dst)
    (dst / "sparsity.safetensors").unlink()
    cfg = load_config(DEMO_CONFIG, {"sae.path": str(dst), "targets.density_scan_tokens": 8000,
                                    "scan.corpus.path": "{shared}/corpora/tinystories-heldout.jsonl", "targets.combinations": []})
    s = load_subject(cfg.model, cfg.sae)
    assert s.log10_density is None
    ts, src = select_targets(s, cfg.targets, cfg.scan.corpus)
    assert src == "corpus scan" and len(ts) == 8
    est = estimate_log10_density(s, cfg.scan.corpus, 8000).numpy()
    from safetensors.torch import load_file

    ref = load_file(str(shared / "saes/tinystories-656k-res/standard-1024/sparsity.safetensors"))["sparsity"].numpy()
    ok = (ref > -3) & (est > -3)
    assert np.corrcoef(est[ok], ref[ok])[0, 1] > 0.8
