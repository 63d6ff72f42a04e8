"""SAE-side rules of loading (used by :func:`sae_targets.loading.load_sae` and
:func:`sae_targets.loading.load_subject`): the SAE's ``model_from_pretrained_kwargs``, sae-lens's
registry (names, closest-name errors), and folding ``expected_average_only_in`` norm scaling into the
weights as sae-lens does.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path
from typing import Any

from reverie.pipeline.errors import LoadError

# not under 'reverie.': the CLI's terminal shows only warnings from here; the run's log file gets everything
log = logging.getLogger("reverie.sae_targets.loading")


def sae_model_kwargs(sae: Any) -> dict[str, Any]:
    """The SAE's ``cfg.metadata.model_from_pretrained_kwargs`` as a new dict ({} when absent):
    the keyword arguments sae-lens passes to ``HookedTransformer.from_pretrained_no_processing``
    when it loads the model the SAE was trained on (e.g. ``{'center_writing_weights': False}``)."""
    meta = getattr(sae.cfg, "metadata", None)
    kw = getattr(meta, "model_from_pretrained_kwargs", None) if meta is not None else None
    return dict(kw or {})


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
