"""Benchmark subjects shared by the scripts in this folder."""

from __future__ import annotations

import torch

from reverie.pipeline.paths import shared_dir
from reverie.sae_targets.loading import Subject


def gpt2_shaped_subject(d_sae: int = 24576, device: str = "cpu", seed: int = 0, backend: str = "hooked") -> Subject:
    """A GPT-2-small-shaped ``HookedTransformer`` (12 layers, d_model 768, vocab 50,257) with random
    weights and the real GPT-2 tokenizer (``{shared}/tokenizers/gpt2``), plus a random sae-lens
    ``StandardSAE`` with ``d_sae`` latents at ``blocks.6.hook_resid_pre`` (its decoder rows are
    random unit directions). ``backend='bridge'``: a ``TransformerBridge`` over a random-weight
    ``GPT2LMHeadModel`` of the same shape instead (other random weights; for timing only).

    Raises:
        ValueError: ``backend`` is neither 'hooked' nor 'bridge'.
    """
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GPT2TokenizerFast

    torch.manual_seed(seed)
    tok = GPT2TokenizerFast.from_pretrained(str(shared_dir() / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if backend == "bridge":
        from transformers import GPT2Config, GPT2LMHeadModel

        from reverie.sae_targets.backend import load_bridge

        hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                                        activation_function="gelu_new"))
        model = load_bridge("gpt2", device, torch.float32, {}, hf_model=hf, tokenizer=tok)
    elif backend == "hooked":
        cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024,
                                      act_fn="gelu_new", normalization_type="LN", device=device, seed=seed)
        model = HookedTransformer(cfg, tokenizer=tok)
        model.eval()
        model.requires_grad_(False)
    else:
        raise ValueError(f"backend {backend!r}: use 'hooked' or 'bridge'")
    hook = "blocks.6.hook_resid_pre"
    sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=d_sae, device=device,
                                        metadata=SAEMetadata(hook_name=hook, prepend_bos=True, context_size=128)))
    sae.eval()
    sae.requires_grad_(False)
    return Subject(model=model, tokenizer=tok, sae=sae, hook_name=hook, layer=6, prepend_bos=True, context_size=128,
                   model_key="gpt2-small-shape-random", sae_key=f"random-standard-{d_sae}")
