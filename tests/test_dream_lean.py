"""The lean forward (stages/dream/lean.py) computes transformer_lens's function from its weights."""

from __future__ import annotations

import pytest
import torch

from reverie.pipeline.config import EPOConfig
from reverie.sae_targets.objectives import Objective
from reverie.stages.dream.evaluator import PromptEvaluator
from reverie.stages.dream.lean import LeanForward, unsupported

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tl_reference(model, tokens, hook_name):
    store = {}
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, lambda x, hook: store.__setitem__("a", x)),
                                                         (last, lambda x, hook: store.__setitem__("r", x))])
    return store["a"], store["r"], logits


def _check(model, hook_name, vocab, start=4):
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (6, 13))
    ref_a, ref_r, ref_logits = _tl_reference(model, tokens, hook_name)
    lean = LeanForward(model, hook_name)
    with torch.no_grad():
        a, r, kv = lean.run(tokens, 0, None, record_kv=True)
        logits = lean.unembed(model.ln_final(r) if model.cfg.normalization_type else r)
        a2, r2, _ = lean.run(tokens[:, start:], start, [(k[:, :start], v[:, :start]) for k, v in kv])
    scale = ref_r.abs().max()
    assert (a - ref_a).abs().max() <= 1e-5 * scale + 1e-5
    assert (r - ref_r).abs().max() <= 1e-5 * scale + 1e-5
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert (r2 - ref_r[:, start:]).abs().max() <= 1e-5 * scale + 1e-5      # from cached keys/values
    assert (a2 - ref_a[:, start:]).abs().max() <= 1e-5 * scale + 1e-5


def test_lean_matches_transformer_lens_on_the_demo_model(subject):
    """Llama architecture: RMSNorm, rotary, grouped-query attention, gated SiLU MLP."""
    assert unsupported(subject.model, subject.hook_name) is None
    _check(subject.model, subject.hook_name, subject.vocab_size)


@pytest.mark.parametrize("kind", ["gpt2", "neox_rotary", "neox_parallel", "rms_pre"])
def test_lean_matches_transformer_lens_on_other_architectures(kind):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=3, d_model=64, d_head=16, n_heads=4, d_mlp=128, d_vocab=300, n_ctx=64, seed=0, device="cpu")
    if kind == "gpt2":
        cfg = HookedTransformerConfig(**base, act_fn="gelu_new", normalization_type="LN")
    elif kind == "neox_rotary":   # GPT-NeoX / Pythia: rotary on part of each head, halves not adjacent pairs
        cfg = HookedTransformerConfig(**base, act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                      rotary_dim=8, rotary_adjacent_pairs=False)
    elif kind == "neox_parallel":   # Pythia: attention and MLP both read the block's input
        cfg = HookedTransformerConfig(**base, act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                      rotary_dim=8, rotary_adjacent_pairs=False, parallel_attn_mlp=True)
    else:
        cfg = HookedTransformerConfig(**base, act_fn="relu", normalization_type="RMSPre", positional_embedding_type="rotary",
                                      rotary_dim=16, rotary_adjacent_pairs=True)
    model = HookedTransformer(cfg)
    for p in model.parameters():          # non-zero biases, so every bias path is checked
        if p.dim() <= 2:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    hooks = ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_post") if cfg.parallel_attn_mlp else \
        ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.2.hook_resid_post")
    for hook in hooks:
        _check(model, hook, cfg.d_vocab)


def test_unsupported_models_fall_back_to_transformer_lens(subject):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    attn_only = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, d_head=8, n_heads=4, d_vocab=50, n_ctx=16,
                                                         attn_only=True, act_fn="relu"))
    assert unsupported(attn_only, "blocks.0.hook_resid_pre") == "attention-only model"
    assert "not a residual-stream hook" in unsupported(subject.model, "blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="does not cover"):
        LeanForward(subject.model, "blocks.0.mlp.hook_post")


@pytest.mark.parametrize("template", [dict(), dict(prefix="Once upon a time", suffix=" and then")])
def test_evaluator_same_numbers_lean_or_not(subject, template):
    """Values, CE terms and token gradients agree with transformer_lens's forward."""
    obj = Objective(sae=subject.sae, latents=[552])
    on = PromptEvaluator(subject, obj, EPOConfig(lean_forward=True, **template))
    off = PromptEvaluator(subject, obj, EPOConfig(lean_forward=False, **template))
    assert on.lean is not None and off.lean is None
    pop = on.random_prompts(6, torch.Generator().manual_seed(4))
    lam = torch.linspace(0.1, 10, 6)
    g1, o1, _ = on.gradients(pop, lam)
    g2, o2, _ = off.gradients(pop, lam)
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(o1, f) - getattr(o2, f)).abs().max() <= 1e-4, f
    assert (g1 - g2).abs().max() <= 1e-3 * g2.abs().max()


def test_bf16_search_reports_float32_numbers(subject):
    """search_dtype = bfloat16: the stored frontier is re-scored in float32."""
    from reverie.stages.dream import run_epo

    obj = Objective(sae=subject.sae, latents=[552])
    cfg = EPOConfig(population=4, children=16, topk=64, iterations=6, search_dtype="bfloat16")
    r = run_epo(subject, obj, cfg, seed=0)
    ev32 = PromptEvaluator(subject, obj, EPOConfig())
    out = ev32.evaluate(torch.tensor([p.token_ids for p in r.frontier]))
    assert torch.allclose(out.act, torch.tensor([p.activation for p in r.frontier]), atol=1e-5)
    assert torch.allclose(out.ce, torch.tensor([p.ce for p in r.frontier]), atol=1e-5)
