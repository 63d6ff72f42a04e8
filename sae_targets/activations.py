"""Latent activations: the one function every stage uses to read SAE latents.

hook activation x → SAE input (sae-lens ``process_sae_in``: dtype, normalization, ``b_dec``
subtraction) → pre-activation ``x_in @ W_enc[:, j] + b_enc[j]`` → post-activation by
architecture (ReLU; JumpReLU: ``relu(pre) * (pre > θ_j)``; TopK / BatchTopK at inference: kept
only if among the k largest of all d_sae pre-activations at that token; gated: the magnitude
path ``x_in @ (W_enc[:, j]·exp(r_mag_j)) + b_mag_j`` is the pre-activation (sae-lens's
``hook_sae_acts_pre``), post = ``relu(pre) · [x_in @ W_enc[:, j] + b_gate_j > 0]``). Those are
read column by column (only the requested latents). Any other per-token sae-lens architecture
(abs-TopK, matching pursuit, transcoders — which read their input hook —, …) falls back to
``sae.encode`` on all d_sae latents, then selects columns: slower, and exactly sae-lens's
numbers; there ``pre`` is not exposed and equals ``post``. Architectures whose encoding is not a
function of one token's activation (temporal SAEs) are refused by :func:`check_architecture`. The decoder-direction projection
``x · W_dec[j] / ‖W_dec[j]‖`` reads the raw hook activation (Thompson et al. 2024 §3.5;
the follow-up post's "dot product with the residual stream").

Everything is differentiable with respect to ``x`` (the dream stage backpropagates through it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Quantity = Literal["pre", "post", "projection"]

COLUMN_ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "gated")
REFUSED_ARCHITECTURES = ("temporal",)


def check_architecture(sae) -> str:
    """How latents of ``sae`` are read: 'columns' (the fast path) or 'encode' (sae-lens's own
    ``encode``, all latents).

    Raises:
        ValueError: the architecture's encoding is not per token (e.g. temporal SAEs) or the
            object has no ``encode``; the message names the supported architectures.
    """
    arch = str(sae.cfg.architecture())
    if arch in COLUMN_ARCHITECTURES:
        return "columns"
    if arch in REFUSED_ARCHITECTURES or not callable(getattr(sae, "encode", None)):
        raise ValueError(f"SAE architecture {arch!r} is not supported: its latents are not a function of one token's activation. "
                         f"Supported: {', '.join(COLUMN_ARCHITECTURES)} (fast path) and any per-token sae-lens architecture "
                         "with an encode() (abs-TopK, matching pursuit, transcoders, ...).")
    return "encode"


@dataclass
class LatentActivations:
    """Pre- and post-activations of selected latents.

    Attributes:
        pre: [..., L] float, SAE pre-activation (encoder output before the nonlinearity).
        post: [..., L] float, SAE post-activation (what ``SAE.encode`` returns for those latents).
    """

    pre: torch.Tensor
    post: torch.Tensor


def _index(sae, latents: torch.Tensor | list[int] | None) -> torch.Tensor | None:
    if latents is None:
        return None
    return torch.as_tensor(latents, dtype=torch.long, device=sae.W_enc.device)


def latent_activations(sae, x: torch.Tensor, latents: torch.Tensor | list[int] | None = None) -> LatentActivations:
    """SAE pre- and post-activations of ``latents`` for hook activations ``x``.

    Args:
        sae: a sae-lens ``SAE`` (architectures: standard/ReLU, jumprelu, topk, batchtopk at inference as topk).
        x: [..., d_in] hook activations (any float dtype; cast to the SAE's dtype).
        latents: L latent ids, or None for all d_sae.

    Returns:
        :class:`LatentActivations` with ``pre`` and ``post`` of shape [..., L] (L = d_sae if None),
        in the SAE's dtype. Equal to ``sae.encode(x)[..., latents]`` for ``post``.

    Raises:
        ValueError: an architecture that :func:`check_architecture` refuses.
    """
    idx = _index(sae, latents)
    if check_architecture(sae) == "encode":
        full = sae.encode(x)
        post = full if idx is None else full[..., idx]
        return LatentActivations(pre=post, post=post)
    x_in = sae.process_sae_in(x)
    arch = sae.cfg.architecture()
    rescale = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        full = x_in @ sae.W_enc + sae.b_enc
        if rescale:
            full = full * sae.W_dec.norm(dim=-1)
        k = int(sae.cfg.k)
        kth = full.topk(k, dim=-1).values[..., -1:]
        pre = full if idx is None else full[..., idx]
        post = torch.relu(pre) * (pre >= kth).to(pre.dtype)  # ties at the k-th value: kept (measure-zero)
        return LatentActivations(pre=pre, post=post)

    W = sae.W_enc if idx is None else sae.W_enc[:, idx]
    if arch == "gated":
        r_mag = sae.r_mag if idx is None else sae.r_mag[idx]
        b_mag = sae.b_mag if idx is None else sae.b_mag[idx]
        b_gate = sae.b_gate if idx is None else sae.b_gate[idx]
        pre = x_in @ (W * r_mag.exp()) + b_mag                 # sae-lens's order of operations
        post = torch.relu(pre) * ((x_in @ W + b_gate) > 0).to(pre.dtype)
        return LatentActivations(pre=pre, post=post)
    b = sae.b_enc if idx is None else sae.b_enc[idx]
    pre = x_in @ W + b
    if arch == "standard":
        post = torch.relu(pre)
    elif arch == "jumprelu":
        thr = sae.threshold if idx is None else sae.threshold[idx]
        post = torch.relu(pre) * (pre > thr.to(pre.dtype)).to(pre.dtype)
    else:
        raise ValueError(f"latent_activations: SAE architecture {arch!r} is not supported (standard, jumprelu, topk)")
    return LatentActivations(pre=pre, post=post)


def decoder_directions(sae, latents: torch.Tensor | list[int] | None = None, unit: bool = True) -> torch.Tensor:
    """Decoder directions ``W_dec[latents]``, shape [L, d_in], unit-normalized when ``unit``."""
    idx = _index(sae, latents)
    W = sae.W_dec if idx is None else sae.W_dec[idx]
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12) if unit else W


def decoder_projection(sae, x: torch.Tensor, latents: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """Projection of hook activations on the unit decoder directions.

    Args:
        x: [..., d_in] hook activations.
    Returns:
        [..., L] float: ``x · W_dec[j] / ‖W_dec[j]‖`` (units of the hook activation).
    """
    d = decoder_directions(sae, latents).to(x.dtype)
    return x @ d.T


def read_latents(sae, x: torch.Tensor, latents: torch.Tensor | list[int] | None, quantity: Quantity = "pre") -> torch.Tensor:
    """The one entry point: ``quantity`` ('pre' | 'post' | 'projection') of ``latents`` at every position.

    Args:
        x: [..., d_in] hook activations.
    Returns:
        [..., L] float tensor.
    Raises:
        ValueError: unknown ``quantity``.
    """
    if quantity == "projection":
        return decoder_projection(sae, x, latents)
    acts = latent_activations(sae, x, latents)
    if quantity == "pre":
        return acts.pre
    if quantity == "post":
        return acts.post
    raise ValueError(f"unknown quantity {quantity!r}: use 'pre', 'post' or 'projection'")


def check_finite_activations(rank: torch.Tensor, post: torch.Tensor, contexts: list | None = None, latents: list[int] | None = None) -> None:
    """Raise when a batch of latent activations holds NaN or Inf (a scan unit then fails, never
    records NaN maxima or densities as 'done').

    Args:
        rank, post: [B, T, L] activations of one batch.
        contexts: the batch's contexts (``doc_idx`` is named in the message), optional.
        latents: the latent id of each of the L slots, optional.
    Raises:
        FloatingPointError: the message names the first bad context and latent and what to check.
    """
    bad = ~(torch.isfinite(rank) & torch.isfinite(post))
    if not bool(bad.any()):
        return
    b, t, j = (int(i) for i in bad.nonzero()[0].tolist())
    doc = getattr(contexts[b], "doc_idx", "?") if contexts else "?"
    lat = latents[j] if latents else j
    raise FloatingPointError(
        f"{int(bad.sum())} NaN/Inf latent activations in a batch (first: document {doc}, position {t}, latent {lat}); "
        "the model or SAE weights hold NaN/Inf, or model.dtype overflows (use model.dtype = \"float32\")")
