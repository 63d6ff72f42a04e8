"""Benchmark subjects shared by the scripts in this folder."""

from __future__ import annotations

import torch

from reverie.pipeline.paths import shared_dir
from reverie.sae_targets.loading import Subject


def gpt2_shaped_subject(d_sae: int = 24576, device: str = "cpu", seed: int = 0) -> Subject:
    """A GPT-2-small-shaped ``HookedTransformer`` (12 layers, d_model 768, vocab 50,257) with random
    weights and the real GPT-2 tokenizer (``{shared}/tokenizers/gpt2``), plus a random sae-lens
    ``StandardSAE`` with ``d_sae`` latents at ``blocks.6.hook_resid_pre`` (its decoder rows are
    random unit directions)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GPT2TokenizerFast

    torch.manual_seed(seed)
    tok = GPT2TokenizerFast.from_pretrained(str(shared_dir() / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024,
                                  act_fn="gelu_new", normalization_type="LN", device=device, seed=seed)
    model = HookedTransformer(cfg, tokenizer=tok)
    model.eval()
    model.requires_grad_(False)
    hook = "blocks.6.hook_resid_pre"
    sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=d_sae, device=device,
                                        metadata=SAEMetadata(hook_name=hook, prepend_bos=True, context_size=128)))
    sae.eval()
    sae.requires_grad_(False)
    return Subject(model=model, tokenizer=tok, sae=sae, hook_name=hook, layer=6, prepend_bos=True, context_size=128,
                   model_key="gpt2-small-shape-random", sae_key=f"random-standard-{d_sae}")
