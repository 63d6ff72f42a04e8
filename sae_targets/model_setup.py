"""How the subject model is set up by sae-lens's rules (used by :func:`sae_targets.loading.load_model`):
the local tokenizer (BOS, right padding, the no-prefix-space fix), transformer_lens's weight-processing
flags as ``from_pretrained_no_processing`` chooses them, and the transformer_lens config of a local
folder whose architecture transformer_lens converts only by hub name (Gemma-3).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from reverie.pipeline.errors import LoadError


def load_tokenizer(model_dir: Path, no_prefix_space: bool = False) -> Any:
    """Load a local Hugging Face tokenizer with BOS added and right padding.

    ``no_prefix_space`` replaces a SentencePiece-style normalizer (which prepends '▁' to the
    text) by a plain ``Replace(' ', '▁')``, for models trained without the dummy prefix
    (the demo TinyStories model; see shared/README.md).

    Raises:
        LoadError: no tokenizer files in ``model_dir``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (model_dir / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir), add_bos_token=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - report any tokenizer failure with the folder
        raise LoadError(f"cannot load a tokenizer from {model_dir}: {e}. The folder needs tokenizer.json or tokenizer files.") from None
    if no_prefix_space and _prepends_prefix(tok):  # a byte-level BPE (GPT-2, NeoX) keeps its own normalizer
        from tokenizers import normalizers

        tok.backend_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _prepends_prefix(tok: Any) -> bool:
    """Whether a fast tokenizer's normalizer prepends a dummy prefix (SentencePiece's '▁')."""
    import json

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    norm = json.loads(backend.to_str()).get("normalizer")
    return '"Prepend"' in json.dumps(norm)


@contextlib.contextmanager
def _known_warnings() -> Iterator[None]:
    """Hide only the named, understood warnings of building a HookedTransformer (category and
    message); every other warning stays visible."""
    with warnings.catch_warnings():
        # transformer_lens 3.x deprecates HookedTransformer (and its from_pretrained) in favour of
        # TransformerBridge; reverie builds HookedTransformer on purpose (model.backend = "hooked": its
        # hook names and numerics) and a user cannot act on the warning
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"HookedTransformer(\.from_pretrained)? is deprecated")
        yield


def _quietly(fn: Any) -> Any:
    """Call ``fn`` with transformers' progress bars ("Loading weights") switched off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn()
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _neutral_dir(model_dir: Path) -> Path:
    """transformer_lens treats a path containing 'llama'/'gemma' specially and skips its
    config.json; give it a symlink with a neutral name instead."""
    if re.search(r"llama|gemma", str(model_dir), re.IGNORECASE):
        tmp = Path(tempfile.mkdtemp(prefix="reverie-model-")) / "model"
        tmp.symlink_to(model_dir.resolve(), target_is_directory=True)
        return tmp
    return model_dir


# transformer_lens's weight processing flags, and their values in ``from_pretrained_no_processing``
# (what sae-lens loads every subject model with, overridden by the SAE's ``model_from_pretrained_kwargs``)
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                 "fold_value_biases": False, "refactor_factored_attn_matrices": False}
# keyword arguments of ``get_pretrained_model_config`` that a local model honours as well
_LOCAL_CONFIG_KWARGS = ("n_ctx", "first_n_layers", "default_prepend_bos")


def processing_flags(kwargs: dict[str, Any], tl_cfg: Any | None = None) -> dict[str, bool]:
    """Weight-processing flags for ``HookedTransformer.load_and_process_state_dict``, chosen as
    ``from_pretrained_no_processing(**kwargs)`` chooses them: every flag False unless ``kwargs``
    sets it, then transformer_lens's own guards (no folding/centring for shortformer or post-norm
    architectures, no unembedding centring with logit soft-capping) when ``tl_cfg`` (a
    ``HookedTransformerConfig``) is given.

    Returns:
        ``{fold_ln, center_writing_weights, center_unembed, fold_value_biases,
        refactor_factored_attn_matrices}`` as bools.
    """
    flags = {k: bool(kwargs.get(k, v)) for k, v in NO_PROCESSING.items()}
    if tl_cfg is not None:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

        if tl_cfg.positional_embedding_type == "shortformer":
            flags.update(fold_ln=False, center_writing_weights=False, center_unembed=False)
        if tl_cfg.original_architecture in POST_NORM_ARCHITECTURES:
            flags.update(fold_ln=False, center_writing_weights=False)
        cap = getattr(tl_cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:
            flags["center_unembed"] = False
    return flags


def _architecture(hf_model: Any) -> str | None:
    archs = getattr(hf_model.config, "architectures", None) or []
    return archs[0] if archs else type(hf_model).__name__


def _gemma3_cfg(hf: Any) -> dict[str, Any]:
    """transformer_lens config fields of a text-only Gemma-3 (``Gemma3ForCausalLM``) from its HF config:
    transformer_lens 3.x builds these only for the hub names ``google/gemma-3-*`` (a hard-coded dict
    per size, loading_from_pretrained.py); this reads the same fields from ``config.json``."""
    types = list(getattr(hf, "layer_types", None) or [])
    if not types:
        pattern = int(getattr(hf, "sliding_window_pattern", 6) or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hf.num_hidden_layers)]
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = (rope.get("full_attention") or {}).get("rope_theta") if isinstance(rope, dict) else None
    theta_local = (rope.get("sliding_attention") or {}).get("rope_theta") if isinstance(rope, dict) else None
    d = {
        "d_model": hf.hidden_size, "d_head": hf.head_dim, "n_heads": hf.num_attention_heads, "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers, "n_ctx": min(int(hf.max_position_embeddings), 8192), "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size, "act_fn": hf.hidden_activation, "initializer_range": hf.initializer_range,
        "normalization_type": "RMS", "rotary_base": theta or getattr(hf, "rope_theta", 1_000_000),
        "rotary_base_local": theta_local or getattr(hf, "rope_local_base_freq", 10_000), "positional_embedding_type": "rotary",
        "use_attn_scale": True, "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5, "n_key_value_heads": hf.num_key_value_heads,
        "gated_mlp": True, "final_rms": True, "use_normalization_before_and_after": True, "use_qk_norm": True,
        "window_size": hf.sliding_window, "use_local_attn": True,
        "attn_types": ["global" if t == "full_attention" else "local" for t in types],
    }
    if getattr(hf, "final_logit_softcapping", None):
        d["output_logits_soft_cap"] = float(hf.final_logit_softcapping)
    if getattr(hf, "attn_logit_softcapping", None):
        d["attn_scores_soft_cap"] = float(hf.attn_logit_softcapping)
    return d


_LOCAL_CONFIGS = {"Gemma3ForCausalLM": _gemma3_cfg}


def _local_tl_config(hf_model: Any, name: str, device: str, dtype: torch.dtype, fold_ln: bool, **kw: Any) -> Any:
    """A ``HookedTransformerConfig`` for a local folder whose architecture transformer_lens converts
    only by hub name (:data:`_LOCAL_CONFIGS`), finished as ``get_pretrained_model_config`` finishes one."""
    from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

    arch = _architecture(hf_model)
    d = _LOCAL_CONFIGS[arch](hf_model.config)
    d.update(original_architecture=arch, tokenizer_name=name, model_name=Path(name).name, init_weights=False,
             device=device, dtype=dtype, n_devices=1, default_prepend_bos=True, from_checkpoint=False)
    if fold_ln:
        d["normalization_type"] = "RMSPre"
    d.update(kw)
    return HookedTransformerConfig.from_dict(d)
