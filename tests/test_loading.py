"""Subject model + SAE loading: parity with reference implementations, and every load error."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
import torch

from reverie.pipeline.config import load_config
from reverie.pipeline.errors import LoadError, OfflineError, TargetError
from reverie.sae_targets.activations import decoder_projection, latent_activations, read_latents
from reverie.sae_targets.contexts import hook_activations
from reverie.sae_targets.loading import check_latents, load_model, load_sae, load_subject
from tests.conftest import DEMO_CONFIG

SAES = ["jumprelu-2048", "standard-1024"]


def _tokens(subject, texts, n=8, max_len=128):
    rows = [subject.with_bos(subject.encode(t))[:max_len] for t in texts[:n]]
    return rows


def test_logits_match_transformers(subject, heldout_texts, shared):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(shared / "models" / "tinystories-656k"), dtype=torch.float32)
    hf.eval()
    worst = 0.0
    n_tok = 0
    for ids in _tokens(subject, heldout_texts):
        t = torch.tensor([ids])
        with torch.no_grad():
            a = subject.model(t)
            b = hf(t).logits
        worst = max(worst, (a - b).abs().max().item())
        n_tok += len(ids)
    assert n_tok > 500
    assert worst <= 1e-4, worst


def test_tokenization_matches_training(subject, heldout_texts):
    # shared/README: training tokens = tok("<|start_story|>" + story, add_special_tokens=False)
    text = heldout_texts[0]
    ref = subject.tokenizer("<|start_story|>" + text, add_special_tokens=False)["input_ids"]
    assert subject.with_bos(subject.encode(text)) == ref


@pytest.mark.parametrize("name", SAES)
def test_latent_activations_match_sae_encode(name, heldout_texts):
    cfg = load_config(DEMO_CONFIG, {"sae.path": f"{{shared}}/saes/tinystories-656k-res/{name}"})
    subject = load_subject(cfg.model, cfg.sae)
    for ids in _tokens(subject, heldout_texts, n=4):
        x = hook_activations(subject, torch.tensor([ids]))
        ref = subject.sae.encode(x)
        ours = latent_activations(subject.sae, x)
        assert (ours.post - ref).abs().max().item() <= 1e-5
        sub = [3, 17, 500]
        assert torch.allclose(read_latents(subject.sae, x, sub, "post"), ref[..., sub], atol=1e-5)
        # pre-activation is what the post-activation gates
        fired = ref[..., sub] > 0
        assert torch.allclose(ours.pre[..., sub][fired], ref[..., sub][fired], atol=1e-5)


def test_topk_post_activation_matches_sae_lens(subject, heldout_texts):
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=128, d_sae=256, k=8, dtype="float32", device="cpu")
    sae = TopKSAE(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    x = hook_activations(subject, torch.tensor([_tokens(subject, heldout_texts, n=1)[0]]))
    assert (latent_activations(sae, x).post - sae.encode(x)).abs().max().item() <= 1e-5
    assert torch.allclose(latent_activations(sae, x, [1, 5]).post, sae.encode(x)[..., [1, 5]], atol=1e-5)


def test_decoder_projection(subject):
    x = torch.randn(2, 3, subject.d_in)
    d = subject.sae.W_dec[7] / subject.sae.W_dec[7].norm()
    assert torch.allclose(decoder_projection(subject.sae, x, [7])[..., 0], x @ d, atol=1e-5)


def test_subject_metadata(subject):
    assert subject.hook_name == "blocks.1.hook_resid_pre"
    assert subject.layer == 1 and subject.prepend_bos and subject.context_size == 128
    assert subject.d_in == 128 and subject.d_sae == 2048 and subject.architecture == "jumprelu"
    assert {0, 1, 2} <= subject.special_ids()
    assert subject.log10_density is not None and subject.log10_density.shape == (2048,)


# ----------------------------------------------------------------------------- errors

def test_hub_model_offline_fails_fast():
    cfg = load_config(DEMO_CONFIG, {"model.path": "", "model.name": "gpt2-small"})
    t = time.time()
    with pytest.raises(OfflineError) as e:
        load_model(cfg.model)
    assert time.time() - t < 20
    assert "model.path" in str(e.value)


def test_hub_sae_offline_fails_fast():
    cfg = load_config(DEMO_CONFIG, {"sae.path": "", "sae.release": "gpt2-small-res-jb", "sae.sae_id": "blocks.6.hook_resid_pre"})
    t = time.time()
    with pytest.raises(OfflineError) as e:
        load_sae(cfg.sae, "cpu")
    assert time.time() - t < 20
    assert "sae.path" in str(e.value)


def test_unknown_release_lists_closest():
    cfg = load_config(DEMO_CONFIG, {"sae.path": "", "sae.release": "gpt2-small-res-jbb", "sae.sae_id": "blocks.6.hook_resid_pre"})
    with pytest.raises(LoadError) as e:
        load_sae(cfg.sae, "cpu")
    assert "gpt2-small-res-jb" in str(e.value)


def test_unknown_sae_id_lists_closest():
    cfg = load_config(DEMO_CONFIG, {"sae.path": "", "sae.release": "gpt2-small-res-jb", "sae.sae_id": "blocks.6.hook_resid_prre"})
    with pytest.raises(LoadError) as e:
        load_sae(cfg.sae, "cpu")
    assert "blocks.6.hook_resid_pre" in str(e.value)


def test_latent_out_of_range():
    with pytest.raises(TargetError, match="d_sae = 2048"):
        check_latents([5, 2048], 2048)


def _sae_copy(shared, tmp_path, edit=None, name="jumprelu-2048"):
    dst = tmp_path / "sae"
    shutil.copytree(shared / "saes" / "tinystories-656k-res" / name, dst)
    if edit:
        c = json.loads((dst / "cfg.json").read_text())
        edit(c)
        (dst / "cfg.json").write_text(json.dumps(c))
    return dst


def test_hook_mismatch(shared, tmp_path):
    def edit(c):
        c["metadata"]["hook_name"] = "blocks.7.hook_resid_pre"

    dst = _sae_copy(shared, tmp_path, edit)
    cfg = load_config(DEMO_CONFIG, {"sae.path": str(dst)})
    with pytest.raises(TargetError, match="does not exist in the model"):
        load_subject(cfg.model, cfg.sae)


def test_width_mismatch(shared, tmp_path):
    def edit(c):
        c["metadata"]["hook_name"] = "blocks.1.mlp.hook_post"  # width 384, SAE d_in 128

    dst = _sae_copy(shared, tmp_path, edit)
    cfg = load_config(DEMO_CONFIG, {"sae.path": str(dst)})
    with pytest.raises(TargetError, match="d_in = 128"):
        load_subject(cfg.model, cfg.sae)


def test_model_name_mismatch_warns(shared, tmp_path):
    def edit(c):
        c["metadata"]["model_name"] = "pythia-70m"

    dst = _sae_copy(shared, tmp_path, edit)
    cfg = load_config(DEMO_CONFIG, {"sae.path": str(dst)})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_subject(cfg.model, cfg.sae)
    assert any("pythia-70m" in str(x.message) for x in w)


def test_corrupt_sae_weights(shared, tmp_path):
    dst = _sae_copy(shared, tmp_path)
    data = (dst / "sae_weights.safetensors").read_bytes()
    (dst / "sae_weights.safetensors").write_bytes(data[: len(data) // 3])
    cfg = load_config(DEMO_CONFIG, {"sae.path": str(dst)})
    with pytest.raises(LoadError, match="corrupt"):
        load_sae(cfg.sae, "cpu")


def test_corrupt_model_weights(shared, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(shared / "models" / "tinystories-656k", dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:1000])
    cfg = load_config(DEMO_CONFIG, {"model.path": str(dst)})
    with pytest.raises(LoadError, match="corrupt"):
        load_model(cfg.model)


def test_missing_dirs(tmp_path):
    cfg = load_config(DEMO_CONFIG, {"model.path": str(tmp_path / "nomodel"), "sae.path": str(tmp_path / "nosae")})
    with pytest.raises(LoadError, match="model directory not found"):
        load_model(cfg.model)
    with pytest.raises(LoadError, match="SAE directory not found"):
        load_sae(cfg.sae, "cpu")


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    """Offline mode off, the configured endpoint (HF_ENDPOINT, here a closed local port) unreachable:
    the probe fails within seconds, naming the endpoint and the fix, instead of retrying."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    cfg = load_config(DEMO_CONFIG, {"model.path": "", "model.name": "gpt2-small"})
    t = time.time()
    with pytest.raises(OfflineError, match=r"cannot reach the Hugging Face hub at http://127\.0\.0\.1:9") as e:
        load_model(cfg.model)
    assert time.time() - t < 10
    assert "model.path" in str(e.value) and "HF_ENDPOINT" in str(e.value)


def test_hub_offline_mode_comes_from_huggingface_hub(monkeypatch):
    """hub_offline / hub_endpoint read huggingface_hub's settings; offline, nothing is probed."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    from reverie.pipeline import hub

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: pytest.fail("probed the hub in offline mode"))
    assert hub.hub_offline()
    hub.check_hub_reachable("a probe", "")  # returns at once
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://mirror.example/")
    assert not hub.hub_offline() and hub.hub_endpoint() == "https://mirror.example"


def test_hook_activations_stop_early_equals_hooked_full_forward(subject, heldout_texts):
    ids = torch.tensor([_tokens(subject, heldout_texts, n=1)[0]])
    _, cache = subject.model.run_with_cache(ids, names_filter=subject.hook_name)
    assert torch.allclose(hook_activations(subject, ids), cache[subject.hook_name], atol=1e-6)
