"""Differentiable objectives f(t) over SAE latents, for dreaming and for baselines.

An :class:`Objective` maps hook activations [B, T, d_in] to one number per prompt [B]. One
latent: its pre-activation (default), post-activation or decoder-direction projection, read at
the last token or as the max over the optimized positions. Several latents at the same
position combine by

* ``lp``: the power mean (1/L · Σ_j relu(a_j/s_j + offset)^p)^(1/p), p < 1 (default 0.1) —
  the follow-up post's L_0.1 objective L_p([relu(a + offset), relu(b + offset)]) on
  per-latent normalized activations a_j/s_j (``scales``), divided by the constant L^(1/p) so
  that L latents all at value x give x: the combined value is on the scale of one normalized
  latent, so λ means the same as for one latent. A latent with relu(·) = 0 contributes 0 (no ε
  inside the power: it is masked, so one dead latent cannot inflate the value);
* ``sum``: Σ_j a_j;
* ``min``: min_j a_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reverie.pipeline.config import TargetsConfig
from reverie.sae_targets.activations import Quantity, read_latents
from reverie.sae_targets.selection import Target
from reverie.sae_targets.spec import objective_key

def combine_latents(a: torch.Tensor, combine: str | None, p: float = 0.1, offset: float = 1.0) -> torch.Tensor:
    """Combine per-latent values into one objective value.

    Args:
        a: [..., L] per-latent activations (already divided by their scales for 'lp').
        combine: None (L must be 1), 'lp', 'sum' or 'min'.
        p: exponent of 'lp', 0 < p < 1.
        offset: added before the ReLU of 'lp', so slightly negative activations still get a gradient.
    Returns:
        [...] float. 'lp' is the power mean (mean_j relu(a_j + offset)^p)^(1/p): the follow-up
        post's L_p norm divided by L^(1/p); terms with relu(·) = 0 are masked to 0 (value and
        gradient), never raised to the power p through an ε.
    Raises:
        ValueError: unknown ``combine``, or None with L > 1.
    """
    if combine is None:
        if a.shape[-1] != 1:
            raise ValueError(f"{a.shape[-1]} latents need a combine rule ('lp', 'sum', 'min')")
        return a[..., 0]
    if combine == "lp":
        r = torch.relu(a + offset)
        alive = r > 0
        safe = torch.where(alive, r, torch.ones_like(r))          # no 0^p: its gradient is inf
        terms = torch.where(alive, safe.pow(p), torch.zeros_like(r))
        mean = terms.mean(-1)
        pos = mean > 0
        return torch.where(pos, torch.where(pos, mean, torch.ones_like(mean)).pow(1.0 / p), torch.zeros_like(mean))
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
        scales: per-latent divisors applied before the combination (lp members normalized to
            one scale, e.g. each latent's random-prompt σ or dataset max); None = 1.
        scale_tag: short name of where ``scales`` came from ('z', 'dataset_max'); part of the key.
    """

    sae: object
    latents: list[int]
    quantity: Quantity = "pre"
    reduce: str = "last"
    combine: str | None = None
    p: float = 0.1
    offset: float = 1.0
    scales: list[float] | None = None
    scale_tag: str | None = None

    @property
    def key(self) -> str:
        """Stable identity, e.g. 'pre:last:123' or 'lp(p=0.1,offset=1.0):pre:last:12+345' (baseline key)."""
        return objective_key(self.latents, self.quantity, self.reduce, self.combine, self.p, self.offset,
                             self.scale_tag if self.scales is not None else None)

    def describe(self) -> str:
        """Human-readable, e.g. 'pre-activation of latent 123 at the last token'."""
        q = {"pre": "pre-activation", "post": "post-activation", "projection": "decoder projection"}[self.quantity]
        where = "at the last token" if self.reduce == "last" else "max over optimized tokens"
        if self.combine is None:
            return f"{q} of latent {self.latents[0]} {where}"
        extra = f" (power mean, p={self.p}, offset={self.offset})" if self.combine == "lp" else ""
        if self.scales is not None:
            extra += f", each latent divided by its {self.scale_tag or 'scale'}"
        return f"{self.combine}{extra} of the {q}s of latents {', '.join(map(str, self.latents))} {where}"

    def latent_values(self, x: torch.Tensor) -> torch.Tensor:
        """Per-latent values at every position, in the latents' own units: [B, T, d_in] → [B, T, L]."""
        return read_latents(self.sae, x, self.latents, self.quantity)

    def combine_values(self, v: torch.Tensor) -> torch.Tensor:
        """[..., L] per-latent values (own units) → [...] combined objective (scales applied)."""
        if self.scales is not None:
            v = v / torch.as_tensor(self.scales, dtype=v.dtype, device=v.device)
        return combine_latents(v, self.combine, self.p, self.offset)

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Combined objective at every position: [B, T, d_in] → [B, T]."""
        return self.combine_values(self.latent_values(x))

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
