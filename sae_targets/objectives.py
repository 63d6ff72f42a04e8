"""Differentiable objectives f(t) over SAE latents, for dreaming and for baselines.

An :class:`Objective` maps hook activations [B, T, d_in] to one number per prompt [B]. One
latent: its pre-activation (default), post-activation or decoder-direction projection, read at
the last token or as the max over the optimized positions. Several latents at the same
position combine by

* ``lp``:  (Σ_j relu(a_j + offset)^p)^(1/p), p < 1 (default 0.1) — the follow-up post's
  L_0.1 objective: smooth, and the optimizer cannot trade one latent away for another;
* ``sum``: Σ_j a_j;
* ``min``: min_j a_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import TargetsConfig
from sae_targets.activations import Quantity, read_latents
from sae_targets.selection import Target

_EPS = 1e-6


def combine_latents(a: torch.Tensor, combine: str | None, p: float = 0.1, offset: float = 1.0) -> torch.Tensor:
    """Combine per-latent values into one objective value.

    Args:
        a: [..., L] per-latent activations.
        combine: None (L must be 1), 'lp', 'sum' or 'min'.
        p: exponent of 'lp', 0 < p < 1.
        offset: added before the ReLU of 'lp', so slightly negative activations still get a gradient.
    Returns:
        [...] float.
    Raises:
        ValueError: unknown ``combine``, or None with L > 1.
    """
    if combine is None:
        if a.shape[-1] != 1:
            raise ValueError(f"{a.shape[-1]} latents need a combine rule ('lp', 'sum', 'min')")
        return a[..., 0]
    if combine == "lp":
        r = torch.relu(a + offset)
        return (r + _EPS).pow(p).sum(-1).pow(1.0 / p)
    if combine == "sum":
        return a.sum(-1)
    if combine == "min":
        return a.min(-1).values
    raise ValueError(f"unknown combine {combine!r}: use 'lp', 'sum' or 'min'")


@dataclass
class Objective:
    """f(t) for one target.

    Attributes:
        sae: the sae-lens SAE.
        latents: latent ids (one, or several for a combination).
        quantity: 'pre' | 'post' | 'projection'.
        reduce: 'last' (value at the final token) | 'max' (max over optimized positions).
        combine / p / offset: see :func:`combine_latents`.
    """

    sae: object
    latents: list[int]
    quantity: Quantity = "pre"
    reduce: str = "last"
    combine: str | None = None
    p: float = 0.1
    offset: float = 1.0

    @property
    def key(self) -> str:
        """Stable identity, e.g. 'pre:last:123' or 'lp(p=0.1,offset=1.0):pre:last:12+345' (baseline key)."""
        ids = "+".join(str(i) for i in self.latents)
        head = "" if self.combine is None else (f"lp(p={self.p},offset={self.offset}):" if self.combine == "lp" else f"{self.combine}:")
        return f"{head}{self.quantity}:{self.reduce}:{ids}"

    def describe(self) -> str:
        """Human-readable, e.g. 'pre-activation of latent 123 at the last token'."""
        q = {"pre": "pre-activation", "post": "post-activation", "projection": "decoder projection"}[self.quantity]
        where = "at the last token" if self.reduce == "last" else "max over optimized tokens"
        if self.combine is None:
            return f"{q} of latent {self.latents[0]} {where}"
        extra = f" (p={self.p}, offset={self.offset})" if self.combine == "lp" else ""
        return f"{self.combine}{extra} of the {q}s of latents {', '.join(map(str, self.latents))} {where}"

    def latent_values(self, x: torch.Tensor) -> torch.Tensor:
        """Per-latent values at every position: [B, T, d_in] → [B, T, L]."""
        return read_latents(self.sae, x, self.latents, self.quantity)

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Combined objective at every position: [B, T, d_in] → [B, T]."""
        return combine_latents(self.latent_values(x), self.combine, self.p, self.offset)

    def reduce_tokens(self, per_token: torch.Tensor, optimized: slice) -> torch.Tensor:
        """[B, T] per-token values → [B]: the last position, or the max over ``optimized``."""
        if self.reduce == "last":
            return per_token[:, -1]
        if self.reduce == "max":
            return per_token[:, optimized].max(dim=-1).values
        raise ValueError(f"unknown reduce {self.reduce!r}: use 'last' or 'max'")

    def __call__(self, x: torch.Tensor, optimized: slice = slice(None)) -> torch.Tensor:
        """f(t) per prompt: [B, T, d_in] hook activations → [B] float (differentiable in x)."""
        return self.reduce_tokens(self.per_token(x), optimized)


def build_objective(sae, target: Target, tcfg: TargetsConfig) -> Objective:
    """The objective of a target under the ``[targets]`` settings (quantity, reduce, p, offset)."""
    return Objective(
        sae=sae, latents=list(target.latents), quantity=tcfg.quantity, reduce=tcfg.reduce,
        combine=target.combine if target.is_combination else None, p=tcfg.p, offset=tcfg.offset,
    )
