"""Load the subject model (transformer_lens) and the SAE (sae-lens), check that they fit.

The result is a :class:`Subject`: model + tokenizer + SAE + what every stage needs to know
about them (hook point, layer, BOS policy, context size, identities). Hub paths
(``HookedTransformer.from_pretrained``, ``SAE.from_pretrained``) are the real ones; offline
they fail within seconds with an error that names the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from reverie.pipeline.config import ModelConfig, SAEConfig
from reverie.pipeline.errors import ConfigError, LoadError, TargetError
from reverie.pipeline.hashing import MODEL_FILES, SAE_FILES, dir_sha256
from reverie.pipeline.hub import check_hub_reachable, hub_offline, offline_error
from reverie.pipeline.paths import expand

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# not under 'reverie.': the CLI's terminal shows only warnings from here; the run's log file gets everything
log = logging.getLogger("reverie.sae_targets.loading")


@dataclass
class Subject:
    """A loaded subject model and SAE, checked to fit each other.

    Attributes:
        model: transformer_lens ``HookedTransformer``, or ``TransformerBridge`` in compatibility mode
            (``model.backend = "bridge"``), in eval mode, gradients off for weights.
        tokenizer: the model's Hugging Face tokenizer (right padding).
        sae: sae-lens ``SAE`` on the model's device.
        hook_name: hook point the SAE reads, e.g. ``blocks.1.hook_resid_pre``.
        layer: block index of the hook; run the model with ``stop_at_layer=layer + 1``.
        prepend_bos: whether prompts start with BOS (from the SAE's metadata).
        context_size: SAE training context length in tokens.
        model_key / sae_key: stable identities ('name' or resolved path; 'release/id' or path).
        neuronpedia_id: Neuronpedia id from the SAE metadata, if any.
        log10_density: per-latent log10 firing frequency, shape [d_sae], float32 (sparsity file), or None.
        model_sha / sae_sha: content hashes (16 hex characters) of the model's and the SAE's files
            (:func:`pipeline.hashing.dir_sha256`; for hub names, the name), part of every cache key.
        model_kwargs: the SAE's ``model_from_pretrained_kwargs`` the model was loaded with.
        normalization: the SAE's ``normalize_activations`` as saved (before any folding).
        norm_scaling_factor: the ``expected_average_only_in`` factor folded into the SAE's weights, or None.
    """

    model: Any
    tokenizer: Any
    sae: Any
    hook_name: str
    layer: int
    prepend_bos: bool
    context_size: int
    model_key: str
    sae_key: str
    neuronpedia_id: str | None = None
    log10_density: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_sha: str | None = None
    sae_sha: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    normalization: str = "none"
    norm_scaling_factor: float | None = None

    @property
    def device(self) -> torch.device:
        return self.model.cfg.device if isinstance(self.model.cfg.device, torch.device) else torch.device(self.model.cfg.device)

    @property
    def backend(self) -> str:
        """'bridge' when the model is a transformer_lens ``TransformerBridge``, else 'hooked'
        (:mod:`sae_targets.backend`)."""
        from reverie.sae_targets.backend import backend_name

        return backend_name(self.model)

    @property
    def stop_at_layer(self) -> int:
        """Blocks the model must run to produce the hook activation: L for ``blocks.L.hook_resid_pre``
        (the residual entering block L is what ``model(..., stop_at_layer=L)`` returns), else L + 1."""
        return self.layer if self.hook_name == f"blocks.{self.layer}.hook_resid_pre" else self.layer + 1

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.d_vocab)

    def special_ids(self) -> set[int]:
        """Ids of BOS, EOS, PAD, UNK and every added special token (never put in a dream)."""
        tok = self.tokenizer
        ids = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None}
        ids.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
        for t, i in (getattr(tok, "added_tokens_encoder", {}) or {}).items():
            ids.add(int(i))
        return {i for i in ids if 0 <= i < self.vocab_size}

    def unusable_ids(self) -> set[int]:
        """Ids no prompt may hold, dream or random baseline alike: :meth:`special_ids` and the
        padding ids beyond the tokenizer (``d_vocab > len(tokenizer)``, e.g. Pythia's 50,304 vs
        50,277), whose embeddings were never trained."""
        return self.special_ids() | set(range(min(len(self.tokenizer), self.vocab_size), self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS or any special token added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_tokens(self, ids: list[int]) -> list[str]:
        """Display pieces of ``ids``, one string per id (:func:`sae_targets.tokens.token_pieces`):
        each token's own bytes with its spaces kept (no words run together), newlines/tabs shown
        as ``\\n``/``\\t``, partial UTF-8 bytes as ``\\xNN``. Their concatenation, read back
        with :func:`sae_targets.tokens.from_display`, is the decoded text."""
        from reverie.sae_targets.tokens import token_pieces

        return token_pieces(self.tokenizer, ids)

    def with_bos(self, ids: list[int]) -> list[int]:
        """Prepend BOS when the SAE's metadata says ``prepend_bos`` (and the tokenizer has one)."""
        if self.prepend_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)


# --------------------------------------------------------------------------- model

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


def sae_model_kwargs(sae: Any) -> dict[str, Any]:
    """The SAE's ``cfg.metadata.model_from_pretrained_kwargs`` as a new dict ({} when absent):
    the keyword arguments sae-lens passes to ``HookedTransformer.from_pretrained_no_processing``
    when it loads the model the SAE was trained on (e.g. ``{'center_writing_weights': False}``)."""
    meta = getattr(sae.cfg, "metadata", None)
    kw = getattr(meta, "model_from_pretrained_kwargs", None) if meta is not None else None
    return dict(kw or {})


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


def load_model(cfg: ModelConfig, no_prefix_space: bool = False, model_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    """Load the subject model as a transformer_lens ``HookedTransformer`` (``model.backend = "hooked"``)
    or ``TransformerBridge`` in compatibility mode (``"bridge"``, :func:`sae_targets.backend.load_bridge`:
    same tokenizer, same processing flags), by sae-lens's rules.

    A hub name loads with ``HookedTransformer.from_pretrained_no_processing(name, **model_kwargs)``
    (sae-lens's ``load_model``); a local folder gets the same processing choices
    (:func:`processing_flags`) applied to its weights, plus the config keywords ``n_ctx``,
    ``first_n_layers`` and ``default_prepend_bos``; other keywords are logged as not applied.
    ``model.device`` and ``model.dtype`` from ``cfg`` always win over ``device``/``dtype`` keywords.

    Args:
        cfg: ``[model]`` section: ``name`` (hub) or ``path`` (local HF directory), device, dtype.
        no_prefix_space: see :func:`load_tokenizer`.
        model_kwargs: the SAE's ``model_from_pretrained_kwargs`` (:func:`sae_model_kwargs`);
            None or {} = no processing at all.

    Returns:
        ``(model, tokenizer, model_key)``; the model is in eval mode with weights frozen.

    Raises:
        OfflineError: a hub name while the hub is unreachable.
        LoadError: missing folder, missing config.json, unreadable or corrupt weights.
        ConfigError: neither model.name nor model.path is set.
    """
    cfg.require()
    dtype = _DTYPES[cfg.dtype]
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k not in ("device", "dtype", "torch_dtype")}
    if cfg.name:
        from transformer_lens import HookedTransformer  # a heavy import (seconds): only once the paths are known to be right

        fix = "Set model.path to a local Hugging Face model directory (e.g. '{shared}/models/tinystories-656k'), or fill the HF cache while online."
        check_hub_reachable(f"model {cfg.name!r}", fix)
        try:
            if cfg.backend == "bridge":  # TransformerBridge in compatibility mode (sae_targets.backend)
                from reverie.sae_targets.backend import load_bridge

                model = load_bridge(cfg.name, cfg.device, dtype, kwargs)
            else:
                with _known_warnings():
                    model = HookedTransformer.from_pretrained_no_processing(cfg.name, device=cfg.device, dtype=dtype, **kwargs)
        except Exception as e:  # noqa: BLE001
            if hub_offline():
                raise offline_error(f"model {cfg.name!r}", fix, e) from None
            raise LoadError(f"cannot load model {cfg.name!r} from the hub: {e}") from None
        model.eval()
        model.requires_grad_(False)
        return model, model.tokenizer, cfg.name

    model_dir = Path(expand(cfg.path)).resolve()
    if not model_dir.is_dir():
        raise LoadError(f"model directory not found: {model_dir}. Set model.path to a local Hugging Face model folder, or model.name for the hub.")
    if not (model_dir / "config.json").exists():
        raise LoadError(f"{model_dir} has no config.json: not a Hugging Face model directory. Set model.path to the folder that holds "
                        "config.json, the weights (*.safetensors) and the tokenizer (e.g. '{shared}/models/tinystories-656k'), or model.name for the hub.")
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lfp
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir, no_prefix_space)
    try:
        with _known_warnings():
            hf_model = _quietly(lambda: AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot read the model weights in {model_dir}: {type(e).__name__}: {e}. The weight file may be corrupt or truncated; restore it.") from None
    if cfg.backend == "bridge":  # the HF model itself behind transformer_lens's hook names (sae_targets.backend)
        from reverie.sae_targets.backend import load_bridge

        try:
            model = load_bridge(str(model_dir), cfg.device, dtype, kwargs, hf_model=hf_model, tokenizer=tok)
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"transformer_lens cannot build a TransformerBridge from {model_dir}: {type(e).__name__}: {e}. "
                            "Set model.backend = \"hooked\" to load it as a HookedTransformer.") from None
        log.info("model %s loaded on %s (%s) as a TransformerBridge, processing %s", model_dir, cfg.device, cfg.dtype, model._reverie_processing)
        return model, tok, str(model_dir)
    neutral = _neutral_dir(model_dir)
    try:
        with _known_warnings():
            cfg_kw = {k: kwargs[k] for k in _LOCAL_CONFIG_KWARGS if k in kwargs}
            flags = processing_flags(kwargs)
            if _architecture(hf_model) in _LOCAL_CONFIGS:  # architectures transformer_lens knows by hub name only
                tl_cfg = _local_tl_config(hf_model, str(neutral), device=cfg.device, dtype=dtype, fold_ln=flags["fold_ln"], **cfg_kw)
            else:
                tl_cfg = lfp.get_pretrained_model_config(str(neutral), device=cfg.device, dtype=dtype, fold_ln=flags["fold_ln"], **cfg_kw)
            flags = processing_flags(kwargs, tl_cfg)
            model = HookedTransformer(tl_cfg, tokenizer=tok, move_to_device=False)
            state = lfp.get_pretrained_state_dict(str(neutral), tl_cfg, hf_model=hf_model, dtype=dtype)
            model.load_and_process_state_dict(state, **flags)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"transformer_lens cannot build a HookedTransformer from {model_dir}: {type(e).__name__}: {e}") from None
    model.to(cfg.device, print_details=False)  # transformer_lens prints "Moving model to device" otherwise
    ignored = sorted(set(kwargs) - set(NO_PROCESSING) - set(_LOCAL_CONFIG_KWARGS))
    if ignored:
        log.warning("the SAE's model_from_pretrained_kwargs %s are not applied to a local model folder (%s)", ignored, model_dir)
    log.info("model %s loaded on %s (%s), processing %s", model_dir, cfg.device, cfg.dtype, flags)
    model.eval()
    model.requires_grad_(False)
    return model, tok, str(model_dir)


# --------------------------------------------------------------------------- SAE

def registry_names() -> dict[str, list[str]]:
    """sae-lens's registry as data: ``{release: [sae_id, ...]}``."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return {rel: list(info.saes_map.keys()) for rel, info in get_pretrained_saes_directory().items()}


def check_registry(release: str, sae_id: str) -> None:
    """Check ``release``/``sae_id`` exist in sae-lens's registry.

    Raises:
        LoadError: unknown release or id; the message lists the closest valid names.
    """
    names = registry_names()
    if release not in names:
        close = difflib.get_close_matches(release, list(names), n=5, cutoff=0.3)
        raise LoadError(f"unknown sae-lens release {release!r}. Closest releases: {', '.join(close) or '(none)'}. See sae_lens/pretrained_saes.yaml for all.")
    ids = names[release]
    if sae_id not in ids:
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.3)
        raise LoadError(f"unknown sae_id {sae_id!r} in release {release!r}. Closest ids: {', '.join(close) or ', '.join(ids[:5])}.")


def load_sae(cfg: SAEConfig, device: str) -> tuple[Any, str, torch.Tensor | None]:
    """Load an SAE with sae-lens, from a local directory or the registry.

    Returns:
        ``(sae, sae_key, log10_density)``; ``log10_density`` is float32 [d_sae] from
        ``sparsity.safetensors`` (or the registry's sparsity) when available, else None.

    Raises:
        LoadError: missing/corrupt files, unknown release/id (with the closest names).
        OfflineError: a registry SAE while the hub is unreachable.
        ConfigError: neither sae.path nor sae.release + sae.sae_id is set.
    """
    cfg.require()
    from sae_lens import SAE

    if cfg.path:
        sae_dir = Path(expand(cfg.path)).resolve()
        if not sae_dir.is_dir():
            raise LoadError(f"SAE directory not found: {sae_dir}. Set sae.path to a sae-lens folder (cfg.json + sae_weights.safetensors) or use sae.release + sae.sae_id.")
        for f in ("cfg.json", "sae_weights.safetensors"):
            if not (sae_dir / f).exists():
                raise LoadError(f"{sae_dir} has no {f}: not a sae-lens SAE directory. Set sae.path to a folder saved by sae-lens "
                                "(cfg.json + sae_weights.safetensors, e.g. '{shared}/saes/tinystories-656k-res/jumprelu-2048'), "
                                "or use sae.release + sae.sae_id from the sae-lens registry.")
        try:  # sae-lens's own warnings (e.g. non-empty model_from_pretrained_kwargs) are shown, not silenced
            sae = SAE.load_from_disk(str(sae_dir), device=device)
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"cannot load the SAE in {sae_dir}: {type(e).__name__}: {e}. cfg.json or sae_weights.safetensors may be corrupt; restore them.") from None
        sae._reverie_normalization = str(getattr(sae.cfg, "normalize_activations", "none"))
        sae._reverie_norm_factor = fold_norm_scaling(sae, sae_dir, cfg.norm_scaling_factor)
        density = None
        sp = sae_dir / "sparsity.safetensors"
        if sp.exists():
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(sp))
            except Exception as e:  # noqa: BLE001
                raise LoadError(f"cannot read {sp}: {e}. Restore or delete it (densities then come from a corpus scan).") from None
            density = next(iter(tensors.values())).float().cpu() if "sparsity" not in tensors else tensors["sparsity"].float().cpu()
        return sae, str(sae_dir), density

    check_registry(cfg.release, cfg.sae_id)
    fix = "Set sae.path to a local sae-lens directory (e.g. '{shared}/saes/tinystories-656k-res/jumprelu-2048'), or fill the HF cache while online."
    what = f"SAE {cfg.release}/{cfg.sae_id}"
    check_hub_reachable(what, fix)
    try:  # from_pretrained folds expected_average_only_in scaling itself (the registry's norm_scaling_factor)
        sae, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(cfg.release, cfg.sae_id, device=device)
    except Exception as e:  # noqa: BLE001
        if hub_offline():
            raise offline_error(what, fix, e) from None
        raise LoadError(f"cannot load {what}: {type(e).__name__}: {e}") from None
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    factor = get_norm_scaling_factor(cfg.release, cfg.sae_id)  # what from_pretrained folded, if anything
    sae._reverie_normalization = "expected_average_only_in" if factor is not None else str(getattr(sae.cfg, "normalize_activations", "none"))
    sae._reverie_norm_factor = factor
    return sae, f"{cfg.release}/{cfg.sae_id}", None if sparsity is None else sparsity.float().cpu()


def fold_norm_scaling(sae: Any, sae_dir: Path | None, factor: float | None = None) -> float | None:
    """Fold ``normalize_activations = "expected_average_only_in"`` scaling into the SAE's weights,
    exactly as sae-lens does (``SAE.fold_activation_norm_scaling_factor``: ``W_enc *= s``,
    ``W_dec /= s``, ``b_dec /= s``, then ``normalize_activations = "none"``), so the SAE reads raw
    hook activations. ``SAE.from_pretrained`` folds the registry's ``norm_scaling_factor`` itself;
    ``SAE.load_from_disk`` does not, and at run time sae-lens treats this mode as the identity, so
    an unfolded SAE sees activations off by the constant factor ``s = sqrt(d_in) / E‖x‖``.

    The factor comes from ``factor`` (``sae.norm_scaling_factor``), else from the folder's
    ``activation_scaler.json`` (``{"scaling_factor": s}``, written beside a sae-lens training
    checkpoint). Without one the SAE is left as it is, with a warning.

    Args:
        sae: a loaded sae-lens ``SAE`` (changed in place).
        sae_dir: the SAE's folder, or None for a registry SAE.
        factor: an explicit scaling factor (> 0), or None.
    Returns:
        The factor folded, or None (nothing to fold, or no factor found).
    Raises:
        LoadError: ``activation_scaler.json`` is unreadable or its factor is not a positive number.
    """
    import json

    if getattr(sae.cfg, "normalize_activations", "none") != "expected_average_only_in":
        return None
    src = "sae.norm_scaling_factor"
    if factor is None and sae_dir is not None and (sae_dir / "activation_scaler.json").is_file():
        f = sae_dir / "activation_scaler.json"
        src = str(f)
        try:
            factor = json.loads(f.read_text()).get("scaling_factor")
        except (OSError, ValueError, AttributeError) as e:
            raise LoadError(f"cannot read {f}: {e}. Restore it, or set sae.norm_scaling_factor.") from None
    if factor is None:
        msg = (f"the SAE {sae_dir or ''} was saved with normalize_activations='expected_average_only_in' and no scaling factor "
               "(sae-lens's load_from_disk does not fold it): its activations are off by a constant factor sqrt(d_in)/E|x|. "
               "Set sae.norm_scaling_factor, or put the training run's activation_scaler.json beside cfg.json.")
        warnings.warn(msg, stacklevel=2)
        log.warning("%s", msg)
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0 or factor == float("inf"):
        raise LoadError(f"the norm scaling factor from {src} is {factor!r}; it must be a positive number (sqrt(d_in) / mean activation norm).")
    sae.fold_activation_norm_scaling_factor(float(factor))
    log.info("folded norm scaling factor %.6g (from %s) into the SAE", factor, src)
    return float(factor)


# --------------------------------------------------------------------------- checks

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str, n_layers: int) -> int:
    """Block index of a hook point ('blocks.L.*' → L; 'hook_embed'/'hook_pos_embed' → 0; 'ln_final.*' → n_layers)."""
    m = _LAYER_RE.match(hook_name)
    if m:
        return int(m.group(1))
    return n_layers if hook_name.startswith("ln_final") else 0


def check_fit(model: Any, sae: Any, model_key: str, expected_model: str | None = None) -> tuple[str, int]:
    """Check the SAE fits the model: hook point exists, widths match, model name (warning).

    Returns:
        ``(hook_name, layer)``.
    Raises:
        TargetError: the hook point is not in the model, or ``d_in`` differs from the hook's width.
    """
    from reverie.sae_targets.activations import check_architecture

    try:
        check_architecture(sae)
    except ValueError as e:
        raise TargetError(str(e)) from None
    meta = sae.cfg.metadata
    hook_name = meta.hook_name
    if hook_name not in model.hook_dict:
        close = difflib.get_close_matches(hook_name or "", list(model.hook_dict), n=3)
        raise TargetError(f"the SAE's hook point {hook_name!r} does not exist in the model {model_key}. Closest hook points: {', '.join(close)}. Use an SAE trained on this model.")
    layer = hook_layer(hook_name, model.cfg.n_layers)
    width = _hook_width(model, hook_name)
    if width is not None and width != sae.cfg.d_in:
        raise TargetError(f"SAE d_in = {sae.cfg.d_in} but the model's activation at {hook_name} has width {width}: the SAE was trained on "
                          "another model or hook. Use an SAE trained on this model's hook point (sae.path / sae.release + sae.sae_id), "
                          "or the model it was trained on (model.path / model.name).")
    check_finite_weights(sae, f"the SAE ({getattr(sae, '_reverie_source', 'sae')})")
    check_finite_weights(model, f"the model {model_key}")
    sae_model = getattr(meta, "model_name", None)
    want = expected_model or Path(model_key).name
    if sae_model and want and sae_model != want:
        warnings.warn(f"the SAE was trained on model {sae_model!r} but the loaded model is {want!r}; activations may be meaningless", stacklevel=2)
    return hook_name, layer


def check_finite_weights(module: Any, what: str) -> None:
    """Raise when any parameter (weight) of ``module`` holds NaN or Inf (buffers are not weights:
    attention masks legitimately hold -inf).

    Args:
        module: a torch module (the model or the SAE).
        what: how the message names it, e.g. "the SAE (/path/to/sae)".
    Raises:
        LoadError: the message names the tensors and how many values are bad.
    """
    bad = []
    for name, t in module.named_parameters():
        if t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()} values)")
    if bad:
        raise LoadError(f"{what} holds NaN/Inf weights: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. The weight file is corrupt "
                        "or was saved from a diverged training run; restore or retrain it (every cached scan of the broken file is keyed "
                        "by its content hash and is not reused).")


def _hook_width(model: Any, hook_name: str) -> int | None:
    cfg = model.cfg
    if any(s in hook_name for s in ("resid", "hook_embed", "hook_pos_embed", "attn_out", "mlp_out", "ln_final")):
        return int(cfg.d_model)
    if hook_name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return int(cfg.d_mlp)
    if hook_name.endswith("hook_z"):
        return int(cfg.n_heads * cfg.d_head)
    return None


def check_latents(latents: list[int], d_sae: int) -> None:
    """Raises TargetError when any latent id is outside ``[0, d_sae)``."""
    bad = sorted({int(i) for i in latents if not 0 <= int(i) < d_sae})
    if bad:
        raise TargetError(f"latent ids {bad} do not exist: this SAE has d_sae = {d_sae} latents (valid ids 0..{d_sae - 1}); "
                          "fix --latent / targets.latents / targets.combinations.")


def load_subject(model_cfg: ModelConfig, sae_cfg: SAEConfig) -> Subject:
    """Load model and SAE, check they fit, read the SAE's metadata.

    Raises:
        LoadError, OfflineError, TargetError: see :func:`load_model`, :func:`load_sae`, :func:`check_fit`.
        ConfigError: no model or no SAE configured (both named when both are missing).
    """
    missing = model_cfg.missing() + sae_cfg.missing()
    if missing:
        raise ConfigError("; ".join(missing))
    sae, sae_key, density = load_sae(sae_cfg, model_cfg.device)  # first: its metadata says how to load the model
    model_kwargs = sae_model_kwargs(sae)
    if model_kwargs:
        log.info("loading the model with the SAE's model_from_pretrained_kwargs %s: sae-lens's warning about them is "
                 "shown on purpose, and these are the kwargs it asks for", model_kwargs)
    model, tok, model_key = load_model(model_cfg, no_prefix_space=model_cfg.tokenizer_no_prefix_space, model_kwargs=model_kwargs)
    sae.requires_grad_(False)
    sae.eval()
    sae._reverie_source = sae_key  # named in check_fit's messages
    hook_name, layer = check_fit(model, sae, model_key, sae_cfg.expected_model)
    meta = sae.cfg.metadata
    ctx = getattr(meta, "context_size", None) or int(model.cfg.n_ctx)
    prepend = getattr(meta, "prepend_bos", None)
    return Subject(
        model=model, tokenizer=tok, sae=sae, hook_name=hook_name, layer=layer,
        prepend_bos=True if prepend is None else bool(prepend), context_size=int(ctx),
        model_key=model_key, sae_key=sae_key, neuronpedia_id=getattr(meta, "neuronpedia_id", None),
        log10_density=density, model_sha=input_sha(model_key, MODEL_FILES), sae_sha=input_sha(sae_key, SAE_FILES),
        model_kwargs=model_kwargs, normalization=getattr(sae, "_reverie_normalization", "none"),
        norm_scaling_factor=getattr(sae, "_reverie_norm_factor", None),
        extra={"sae_release": sae_cfg.release, "sae_id": sae_cfg.sae_id} if not sae_cfg.path else {},
    )


def input_sha(key: str, patterns: tuple[str, ...]) -> str:
    """Content hash of a local model / SAE folder (:func:`pipeline.hashing.dir_sha256`, cached by
    path, size and mtime), or ``'name:' + key`` for a hub name / registry id (whose files the
    hub's revision pins)."""
    p = Path(key)
    return dir_sha256(p, patterns) if p.is_dir() else f"name:{key}"


def sae_cfg_d_sae(cfg: SAEConfig) -> int | None:
    """``d_sae`` from a local SAE folder's ``cfg.json``, read without loading any weights (None for
    a registry SAE, or when cfg.json has no integer ``d_sae``).

    Raises:
        LoadError: the folder or its cfg.json is missing, or cfg.json is not JSON.
    """
    import json

    if not cfg.path:
        return None
    sae_dir = Path(expand(cfg.path)).resolve()
    f = sae_dir / "cfg.json"
    if not sae_dir.is_dir():
        raise LoadError(f"SAE directory not found: {sae_dir}. Set sae.path to a sae-lens folder (cfg.json + sae_weights.safetensors) or use sae.release + sae.sae_id.")
    if not f.is_file():
        raise LoadError(f"{sae_dir} has no cfg.json: not a sae-lens SAE directory. Set sae.path to a folder saved by sae-lens "
                        "(cfg.json + sae_weights.safetensors), or use sae.release + sae.sae_id from the sae-lens registry.")
    try:
        data = json.loads(f.read_text(encoding="utf-8", errors="replace"))
    except ValueError as e:
        raise LoadError(f"{f} is not valid JSON ({e}); restore the SAE's cfg.json") from None
    d = data.get("d_sae") if isinstance(data, dict) else None
    return int(d) if isinstance(d, int) and not isinstance(d, bool) else None


def precheck_targets(latents: list[int], combinations: list[list[int]], sae_cfg: SAEConfig, combine: str | None = None,
                     n_random: int | None = None) -> None:
    """Check latent ids before anything slow loads: each within the SAE's ``d_sae`` (from cfg.json),
    no latent twice in one combination.

    Args:
        latents: explicit single latents (or the members of a ``combine`` target).
        combinations: multi-latent targets.
        combine: when set, ``latents`` form one combination (``reverie dream --combine``).
        n_random: ``targets.n_random`` when random latents are drawn without explicit ones: 0 with
            no latents and no combinations is an error (nothing to explain).
    Raises:
        TargetError: an id outside ``[0, d_sae)`` or a repeated latent; the message says how to fix it.
        LoadError: the SAE folder or its cfg.json is missing or unreadable.
    """
    if n_random is not None and n_random <= 0 and not latents and not combinations:
        raise TargetError("nothing to explain: targets.latents and targets.combinations are empty and targets.n_random = 0; "
                          "set targets.n_random >= 1 (or --n 1), or list latents (targets.latents / --latent)")
    groups = [list(c) for c in combinations] + ([list(latents)] if combine else [])
    for g in groups:
        dup = sorted({i for i in g if g.count(i) > 1})
        if dup:
            raise TargetError(f"the combination {g} repeats latent(s) {dup}: a combination needs distinct latents; "
                              "remove the repeat (e.g. --latent 552 --latent 1300 --combine lp)")
    d_sae = sae_cfg_d_sae(sae_cfg)
    if d_sae is not None:
        check_latents([*latents, *(i for g in groups for i in g)], d_sae)


def subject_from(model: Any, sae: Any, tokenizer: Any = None) -> Subject:
    """A :class:`Subject` from a model and SAE already in memory (the library API's entry point).

    Args:
        model: a transformer_lens ``HookedTransformer``.
        sae: a sae-lens ``SAE`` (its ``cfg.metadata`` gives the hook point, BOS policy, context size).
        tokenizer: defaults to ``model.tokenizer``.
    Returns:
        The checked :class:`Subject` (model and SAE frozen, in eval mode).
    Raises:
        LoadError: no tokenizer. TargetError: see :func:`check_fit`.
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise LoadError("the model has no tokenizer: pass tokenizer=... (a Hugging Face tokenizer)")
    model.eval()
    model.requires_grad_(False)
    sae.eval()
    sae.requires_grad_(False)
    name = getattr(model.cfg, "model_name", None) or "in-memory model"
    hook_name, layer = check_fit(model, sae, name)
    meta = sae.cfg.metadata
    prepend = getattr(meta, "prepend_bos", None)
    return Subject(model=model, tokenizer=tok, sae=sae, hook_name=hook_name, layer=layer,
                   prepend_bos=True if prepend is None else bool(prepend),
                   context_size=int(getattr(meta, "context_size", None) or model.cfg.n_ctx),
                   model_key=f"in-memory:{name}", sae_key=f"in-memory:{getattr(meta, 'sae_id', None) or hook_name}",
                   neuronpedia_id=getattr(meta, "neuronpedia_id", None))
