"""Loading by sae-lens's rules (issue 14): the SAE first, then the model with the SAE's
``model_from_pretrained_kwargs``; norm-scaling folding; the SAE's identity in the database.

The reference is sae-lens's own path: ``HookedSAETransformer.from_pretrained_no_processing(name,
**sae.cfg.metadata.model_from_pretrained_kwargs)`` then ``run_with_cache_with_saes`` (its
``hook_sae_acts_post``). transformer_lens takes hub names only, so the tests let its name lookup
accept the local folder (``get_official_model_name``); everything else is the library's code.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from reverie.pipeline.config import ModelConfig, SAEConfig
from reverie.sae_targets.loading import load_sae, load_subject, processing_flags
from tests.realshapes import build_model, edit_cfg, save_sae

HOOK = "blocks.1.hook_resid_pre"
TEXT = "Once upon a time, a small robot walked to the market and bought three red apples for its friend."


@pytest.fixture()
def local_names(monkeypatch):
    """transformer_lens's hub-name lookup, letting a local folder through (offline stand-in for a hub name)."""
    from transformer_lens import loading_from_pretrained as lfp

    orig = lfp.get_official_model_name
    monkeypatch.setattr(lfp, "get_official_model_name", lambda n: n if os.path.isdir(n) else orig(n))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, shared):
    """A random GPT-2-shaped model (LayerNorm: centring its writing weights changes the residuals)."""
    return build_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", shared, "gpt2")


def _sae_lens_acts(model_dir, sae, tokens, tokenizer):
    from sae_lens import HookedSAETransformer

    ref = HookedSAETransformer.from_pretrained_no_processing(str(model_dir), device="cpu", tokenizer=tokenizer,
                                                             **sae.cfg.metadata.model_from_pretrained_kwargs)
    _, cache = ref.run_with_cache_with_saes(tokens, saes=[sae])
    return cache[f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"]


def _reverie_acts(subject, tokens):
    from reverie.stages.scan.stage import batch_activations

    return batch_activations(subject, list(range(subject.d_sae)), "post", tokens)[1]


def _tokens(subject):
    return torch.tensor([subject.with_bos(subject.encode(TEXT))])


@pytest.mark.parametrize("kwargs", [{"center_writing_weights": False, "fold_ln": False},
                                    {"center_writing_weights": True, "fold_ln": True}])
def test_local_model_processed_as_sae_lens_does(gpt2_dir, tmp_path, local_names, one_torch_thread, kwargs):
    sae_dir = save_sae(tmp_path / "sae", 64, HOOK, "tiny-gpt2", model_kwargs=kwargs)
    subject = load_subject(ModelConfig(path=str(gpt2_dir), tokenizer_no_prefix_space=False), SAEConfig(path=str(sae_dir)))
    assert subject.model_kwargs == kwargs
    assert subject.model.cfg.normalization_type == ("LNPre" if kwargs["fold_ln"] else "LN")
    toks = _tokens(subject)
    ours = _reverie_acts(subject, toks)
    ref = _sae_lens_acts(gpt2_dir, subject.sae, toks, subject.tokenizer)
    assert float(ref.abs().max()) > 0.1 and int((ref > 0).sum()) > 20      # latents fire: the comparison means something
    assert (ours - ref).abs().max().item() <= 1e-5


def test_default_processing_would_have_differed(gpt2_dir, tmp_path, local_names, one_torch_thread):
    """An SAE trained on the unprocessed model, fed a from_pretrained-default model (centred writing
    weights, folded LN, centred unembedding), reads different activations: what reverie's old hub path did."""
    from transformer_lens import HookedTransformer

    kwargs = {"center_writing_weights": False, "fold_ln": False}
    sae_dir = save_sae(tmp_path / "sae", 64, HOOK, "tiny-gpt2", model_kwargs=kwargs)
    subject = load_subject(ModelConfig(path=str(gpt2_dir), tokenizer_no_prefix_space=False), SAEConfig(path=str(sae_dir)))
    toks = _tokens(subject)
    ours = _reverie_acts(subject, toks)
    default = HookedTransformer.from_pretrained(str(gpt2_dir), device="cpu", tokenizer=subject.tokenizer)
    _, cache = default.run_with_cache(toks, names_filter=HOOK)
    theirs = subject.sae.encode(cache[HOOK])
    diff = (ours - theirs).abs().max().item()
    assert diff > 1e-2 * ours.abs().max().item(), diff


def test_demo_sae_matches_sae_lens_path(subject, local_names, one_torch_thread):
    """The demo JumpReLU SAE carries {'center_writing_weights': False}: reverie's activations equal sae-lens's."""
    assert subject.model_kwargs == {"center_writing_weights": False}
    toks = _tokens(subject)
    ref = _sae_lens_acts(subject.model_key, subject.sae, toks, subject.tokenizer)
    assert (_reverie_acts(subject, toks) - ref).abs().max().item() <= 1e-5


def test_hub_model_loads_with_sae_kwargs(monkeypatch):
    """A hub name loads with from_pretrained_no_processing(name, **model_from_pretrained_kwargs)."""
    import transformer_lens

    from reverie.sae_targets import loading

    seen = {}

    class Stop(Exception):
        pass

    def fake(name, **kw):
        seen.update(name=name, **kw)
        raise Stop

    monkeypatch.setattr(loading, "check_hub_reachable", lambda *a, **k: None)
    monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained_no_processing", staticmethod(fake))
    with pytest.raises(Exception):
        loading.load_model(ModelConfig(name="gpt2-small", path=""), model_kwargs={"center_writing_weights": False, "device": "cuda"})
    assert seen["name"] == "gpt2-small" and seen["center_writing_weights"] is False and seen["device"] == "cpu"


def test_processing_flags_follow_no_processing_defaults():
    assert processing_flags({}) == {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                                    "fold_value_biases": False, "refactor_factored_attn_matrices": False}
    assert processing_flags({"fold_ln": True})["fold_ln"] is True


def test_sae_lens_warning_not_silenced(shared):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_sae(SAEConfig(path=str(shared / "saes" / "tinystories-656k-res" / "jumprelu-2048")), "cpu")
    assert any("model_from_pretrained_kwargs" in str(x.message) for x in w)


# --------------------------------------------------------------------------- norm scaling

def _scaled_copy(src, dst, s: float, scaler_file: bool):
    """``src`` saved as sae-lens would save an SAE trained on activations scaled by ``s`` (before
    folding): W_enc / s, W_dec * s, b_dec * s, normalize_activations = expected_average_only_in."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "sae_weights.safetensors"))
    w["W_enc"] = w["W_enc"] / s
    w["W_dec"] = w["W_dec"] * s
    w["b_dec"] = w["b_dec"] * s
    save_file(w, str(dst / "sae_weights.safetensors"))
    edit_cfg(dst, normalize_activations="expected_average_only_in")
    if scaler_file:
        (dst / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
    return dst


def test_norm_scaling_folded_from_activation_scaler(subject, tmp_path, heldout_texts):
    from reverie.sae_targets.activations import latent_activations
    from reverie.sae_targets.contexts import hook_activations

    s = 0.0731
    dst = _scaled_copy(subject.sae_key, tmp_path / "scaled", s, scaler_file=True)
    sae, _, _ = load_sae(SAEConfig(path=str(dst)), "cpu")
    assert sae._reverie_normalization == "expected_average_only_in" and sae._reverie_norm_factor == pytest.approx(s)
    assert sae.cfg.normalize_activations == "none"
    x = hook_activations(subject, torch.tensor([subject.with_bos(subject.encode(heldout_texts[0]))[:64]]))
    want = latent_activations(subject.sae, x).post
    got = latent_activations(sae, x).post
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    # sae-lens's own fold gives the same weights
    from sae_lens import SAE

    ref = SAE.load_from_disk(str(dst))
    ref.fold_activation_norm_scaling_factor(s)
    assert (ref.encode(x) - got).abs().max().item() <= 1e-6


def test_norm_scaling_without_factor_warns_and_setting_folds(subject, tmp_path, heldout_texts):
    from reverie.sae_targets.activations import latent_activations
    from reverie.sae_targets.contexts import hook_activations

    s = 0.0731
    dst = _scaled_copy(subject.sae_key, tmp_path / "scaled", s, scaler_file=False)
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        sae, _, _ = load_sae(SAEConfig(path=str(dst)), "cpu")
    assert sae._reverie_norm_factor is None
    x = hook_activations(subject, torch.tensor([subject.with_bos(subject.encode(heldout_texts[0]))[:64]]))
    want = latent_activations(subject.sae, x).post
    assert (latent_activations(sae, x).post - want).abs().max().item() > 0.1   # unfolded: off by the scale
    sae2, _, _ = load_sae(SAEConfig(path=str(dst), norm_scaling_factor=s), "cpu")
    assert (latent_activations(sae2, x).post - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


# --------------------------------------------------------------------------- identity in the database

def test_sae_identity_recorded_and_read_by_reports(subject, tmp_path):
    from reverie.pipeline.sae_identity import record_sae, run_sae
    from reverie.pipeline.store import Store
    from reverie.reports.data import neuronpedia_id_for

    with Store(tmp_path / "p") as store:
        store.start_run("r1", "test", "{}", "0")
        subject_np = subject.neuronpedia_id
        try:
            subject.neuronpedia_id = "tinystories-656k/1-res-jr"     # as a registry SAE would carry it
            record_sae(store, "r1", subject)
        finally:
            subject.neuronpedia_id = subject_np
        row = run_sae(store, "r1")
        assert row["source"] == "local" and row["sae_key"] == subject.sae_key and row["sae_sha"] == subject.sae_sha
        assert (row["architecture"], row["d_in"], row["d_sae"], row["hook_name"]) == ("jumprelu", 128, 2048, HOOK)
        assert row["prepend_bos"] is True and row["normalization"] == "none" and row["norm_scaling_factor"] is None
        assert json.loads(row["model_kwargs_json"]) == {"center_writing_weights": False}
        assert neuronpedia_id_for(store, "r1", {}) == "tinystories-656k/1-res-jr"
        assert neuronpedia_id_for(store, "other", {"neuronpedia_id": "x/y"}) == "x/y"   # runs before migration 0012
        assert neuronpedia_id_for(store, "other", {}) is None


def test_registry_sae_identity_row():
    from types import SimpleNamespace

    from reverie.pipeline.sae_identity import sae_identity_row

    s = SimpleNamespace(sae_key="gemma-scope-2-270m-pt-res/layer_5_width_16k_l0_small", sae_sha="name:x", architecture="jumprelu",
                        d_in=640, d_sae=16384, hook_name="blocks.5.hook_resid_post", prepend_bos=True, context_size=1024,
                        normalization="none", norm_scaling_factor=None, model_kwargs={}, neuronpedia_id="gemma-3-270m/5-gemmascope-2-res-16k",
                        model_key="google/gemma-3-270m", model_sha="name:google/gemma-3-270m",
                        extra={"sae_release": "gemma-scope-2-270m-pt-res", "sae_id": "layer_5_width_16k_l0_small"})
    row = sae_identity_row("r", s)
    assert (row["source"], row["release"], row["sae_id"]) == ("registry", "gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_small")
    assert row["neuronpedia_id"] == "gemma-3-270m/5-gemmascope-2-res-16k" and row["model_kwargs_json"] == "{}"
