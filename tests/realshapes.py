"""Small random-weight subject models with real architectures, saved as Hugging Face folders, and
random sae-lens SAEs saved beside them (issue 14: real SAEs, real models; nothing trained).

- GPT-2 (LayerNorm: the weight processing sae-lens's metadata controls changes its residuals),
- Gemma-3 (``Gemma3ForCausalLM``: sliding/full attention layers, q/k norms, GQA, head_dim ≠
  d_model / n_heads, soft-capping off, tied embeddings; the GPT-2 tokenizer stands in for Gemma's),
- GPT-NeoX / Pythia (parallel residual, partial rotary; ``d_vocab`` 50,304 > the NeoX tokenizer's
  50,277 ids: the padding-id case).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _tokenizer(shared: Path, kind: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    if kind == "neox":
        return PreTrainedTokenizerFast(tokenizer_file=str(shared / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                                       bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_file=str(shared / "tokenizers" / "gpt2" / "tokenizer.json"),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_model(out: Path, shared: Path, kind: str, seed: int = 0) -> Path:
    """Save a random ``kind`` ('gpt2' | 'gemma3' | 'neox') causal LM + tokenizer under ``out``.

    Returns:
        The folder (config.json, model.safetensors, tokenizer files).
    """
    import transformers as tf

    torch.manual_seed(seed)
    tok = _tokenizer(shared, kind)
    eos = tok.eos_token_id
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(tok), n_positions=128, n_ctx=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32,
            rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
            tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        cfg.architectures = ["Gemma3ForCausalLM"]
        model = tf.Gemma3ForCausalLM(cfg)
    elif kind == "neox":
        cfg = tf.GPTNeoXConfig(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                               rotary_pct=0.25, max_position_embeddings=256, use_parallel_residual=True, tie_word_embeddings=False,
                               bos_token_id=eos, eos_token_id=eos)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norms and biases (random init leaves them at 1 / 0)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def save_sae(out: Path, d_in: int, hook_name: str, model_name: str, arch: str = "standard", d_sae: int = 96,
             model_kwargs: dict[str, Any] | None = None, seed: int = 0, scale: float = 0.3) -> Path:
    """Save a random sae-lens SAE (``arch`` 'standard' | 'jumprelu') reading ``hook_name`` under ``out``.

    Returns:
        The folder (cfg.json + sae_weights.safetensors).
    """
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True, context_size=64,
                       model_from_pretrained_kwargs=dict(model_kwargs or {}))
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", metadata=meta)
    sae = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common)) if arch == "jumprelu" else sl.StandardSAE(sl.StandardSAEConfig(**common))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.normal_(0, scale)
            if "threshold" in name:
                p.abs_().mul_(0.1)
        sae.b_enc.add_(0.2)  # some latents fire on random residuals
    out.mkdir(parents=True, exist_ok=True)
    sae.save_model(str(out))
    return out


def edit_cfg(sae_dir: Path, **changes: Any) -> None:
    """Change top-level keys of an SAE folder's cfg.json (``metadata`` keys via ``metadata={...}``, merged)."""
    f = sae_dir / "cfg.json"
    d = json.loads(f.read_text())
    for k, v in changes.items():
        if k == "metadata":
            d.setdefault("metadata", {}).update(v)
        else:
            d[k] = v
    f.write_text(json.dumps(d))
