"""Every sae-lens architecture reads exactly as ``SAE.encode`` does (issue: real SAEs, real models).

Small SAEs are built with sae-lens's own constructors (random weights, nothing trained) and fed
real demo-model activations of held-out stories.
"""

from __future__ import annotations

import pytest
import torch

from reverie.pipeline.errors import TargetError
from reverie.sae_targets.activations import check_architecture, latent_activations, read_latents
from reverie.sae_targets.contexts import hook_activations


def _x(subject, heldout_texts):
    ids = subject.with_bos(subject.encode(heldout_texts[0]))[:64]
    return hook_activations(subject, torch.tensor([ids]))


def _build(kind: str):
    import sae_lens as sl

    d_in, d_sae = 128, 96
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu")
    if kind == "standard":
        sae = sl.StandardSAE(sl.StandardSAEConfig(**common))
    elif kind == "jumprelu":
        sae = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common))
    elif kind == "topk":
        sae = sl.TopKSAE(sl.TopKSAEConfig(k=6, **common))
    elif kind == "gated":
        sae = sl.GatedSAE(sl.GatedSAEConfig(**common))
    elif kind == "abs_topk":
        sae = sl.AbsTopKSAE(sl.AbsTopKSAEConfig(k=6, **common))
    elif kind == "transcoder":
        sae = sl.JumpReLUTranscoder(sl.JumpReLUTranscoderConfig(d_out=d_in, apply_b_dec_to_input=False, **common))
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.normal_(0, 0.05 if "threshold" not in name else 0.02)
            if "threshold" in name:
                p.abs_()
    return sae


@pytest.mark.parametrize("kind,path", [("standard", "columns"), ("jumprelu", "columns"), ("topk", "columns"), ("gated", "columns"),
                                       ("abs_topk", "encode"), ("transcoder", "encode")])
def test_post_activation_matches_sae_encode(subject, heldout_texts, kind, path):
    sae = _build(kind)
    assert check_architecture(sae) == path
    x = _x(subject, heldout_texts)
    ref = sae.encode(x)
    assert (latent_activations(sae, x).post - ref).abs().max().item() <= 1e-5
    sub = [2, 40, 95]
    assert (read_latents(sae, x, sub, "post") - ref[..., sub]).abs().max().item() <= 1e-5
    assert float(ref.detach().abs().sum()) > 0      # the test exercises firing latents


def test_gated_pre_activation_is_the_magnitude_path(subject, heldout_texts):
    sae = _build("gated")
    x = _x(subject, heldout_texts)
    store = {}
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: store.__setitem__("pre", t))
    sae.encode(x)
    sae.reset_hooks()
    assert (latent_activations(sae, x, [5, 9]).pre - store["pre"][..., [5, 9]]).abs().max().item() <= 1e-5


def test_unsupported_architecture_fails_in_check_fit(subject):
    from reverie.sae_targets.loading import check_fit

    class Temporal:     # stands for sae-lens's TemporalSAE: encoding depends on other tokens
        class cfg:
            @staticmethod
            def architecture():
                return "temporal"
    with pytest.raises(TargetError, match="temporal.*not supported"):
        check_fit(subject.model, Temporal(), "m")
