"""Load the subject model (transformer_lens) and the SAE (sae-lens), check that they fit.

The result is a :class:`Subject`: model + tokenizer + SAE + what every stage needs to know
about them (hook point, layer, BOS policy, context size, identities). Hub paths
(``HookedTransformer.from_pretrained``, ``SAE.from_pretrained``) are the real ones; offline
they fail within seconds with an error that names the fix.

What the loaders follow lives beside them: :mod:`sae_targets.subject` (the :class:`Subject`),
:mod:`sae_targets.model_setup` (tokenizer, weight-processing flags, transformer_lens configs of
local folders), :mod:`sae_targets.sae_setup` (sae-lens's registry, norm-scaling folding) and
:mod:`sae_targets.fit` (model/SAE fit and latent-id checks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from reverie.pipeline.config import ModelConfig, SAEConfig
from reverie.pipeline.errors import ConfigError, LoadError
from reverie.pipeline.hashing import MODEL_FILES, SAE_FILES, dir_sha256
from reverie.pipeline.hub import check_hub_reachable, hub_errors
from reverie.pipeline.paths import expand
from reverie.sae_targets.fit import check_fit
from reverie.sae_targets.fit import check_latents, precheck_targets  # noqa: F401 - re-exported (the CLI, the orchestrator, stages and tests import them from here)
from reverie.sae_targets.model_setup import _LOCAL_CONFIG_KWARGS, _LOCAL_CONFIGS, NO_PROCESSING, _architecture, _known_warnings
from reverie.sae_targets.model_setup import _local_tl_config, _neutral_dir, _quietly, load_tokenizer, processing_flags
from reverie.sae_targets.sae_setup import check_registry, fold_norm_scaling, sae_model_kwargs
from reverie.sae_targets.subject import Subject

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# not under 'reverie.': the CLI's terminal shows only warnings from here; the run's log file gets everything
log = logging.getLogger("reverie.sae_targets.loading")


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
        with hub_errors(f"model {cfg.name!r}", fix):
            if cfg.backend == "bridge":  # TransformerBridge in compatibility mode (sae_targets.backend)
                from reverie.sae_targets.backend import load_bridge

                model = load_bridge(cfg.name, cfg.device, dtype, kwargs)
            else:
                with _known_warnings():
                    model = HookedTransformer.from_pretrained_no_processing(cfg.name, device=cfg.device, dtype=dtype, **kwargs)
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
    with hub_errors(what, fix):  # from_pretrained folds expected_average_only_in scaling itself (the registry's norm_scaling_factor)
        sae, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(cfg.release, cfg.sae_id, device=device)
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    factor = get_norm_scaling_factor(cfg.release, cfg.sae_id)  # what from_pretrained folded, if anything
    sae._reverie_normalization = "expected_average_only_in" if factor is not None else str(getattr(sae.cfg, "normalize_activations", "none"))
    sae._reverie_norm_factor = factor
    return sae, f"{cfg.release}/{cfg.sae_id}", None if sparsity is None else sparsity.float().cpu()


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
