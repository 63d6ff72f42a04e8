"""Checks that a model, an SAE and the requested latents fit each other: the hook point exists and
has the SAE's width, the SAE's architecture is supported, weights are finite, latent ids are within
``d_sae`` (also before anything loads, from the SAE folder's cfg.json).
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from reverie.pipeline.config import SAEConfig
from reverie.pipeline.errors import LoadError, TargetError
from reverie.pipeline.paths import expand


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
