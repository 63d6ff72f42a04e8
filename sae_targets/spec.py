"""What a target and its objective *are*, as plain data, without torch.

Readers of stored or in-memory rows (the compare stage, the report) name targets and objectives
and read random-prompt baselines; they never evaluate an objective, so they import this module
and not :mod:`sae_targets.objectives` / :mod:`sae_targets.baseline` (which need torch, ~2 s to
import). Those modules re-export these names, so ``from reverie.sae_targets.selection import
Target`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Target:
    """One thing to explain: a single latent, or several latents combined into one objective.

    Attributes:
        latents: latent ids (one for a single latent).
        combine: None for one latent; 'lp' | 'sum' | 'min' for a combination.
        log10_density: log10 firing frequency per latent (None where unknown).
    """

    latents: list[int]
    combine: str | None = None
    log10_density: list[float | None] = field(default_factory=list)

    @property
    def target_id(self) -> str:
        """'123' for one latent, '12+345' for a combination."""
        return "+".join(str(i) for i in self.latents)

    @property
    def is_combination(self) -> bool:
        return len(self.latents) > 1


def objective_key(latents: Sequence[int], quantity: str = "pre", reduce: str = "last", combine: str | None = None,
                  p: float = 0.1, offset: float = 1.0, scale_tag: str | None = None) -> str:
    """Stable identity of an objective (the ``objective_key`` of baselines, windows and dreams).

    The one definition behind :attr:`sae_targets.objectives.Objective.key`.

    Args:
        latents: latent ids, in the target's order.
        quantity: 'pre' | 'post' | 'projection'. reduce: 'last' | 'max'.
        combine: None (one latent) or 'lp' | 'sum' | 'min'; p / offset: the 'lp' parameters.
        scale_tag: where the per-latent scales came from ('z', 'dataset_max'), or None (unscaled).
    Returns:
        e.g. 'pre:last:123', 'lp(p=0.1,offset=1.0):pre:last:12+345', 'lp(p=0.1,offset=1.0,scale=z):pre:last:12+345'.
    """
    ids = "+".join(str(int(i)) for i in latents)
    tag = f",scale={scale_tag}" if scale_tag else ""
    head = "" if combine is None else (f"lp(p={p},offset={offset}{tag}):" if combine == "lp" else f"{combine}{tag}:")
    return f"{head}{quantity}:{reduce}:{ids}"


def target_objective_key(target: Target, tcfg: Any) -> str:
    """The unscaled objective key of ``target`` under ``[targets]`` settings (``quantity``, ``reduce``, ``p``, ``offset``).

    Equal to ``build_objective(sae, target, tcfg).key`` without building the objective (no torch).

    Args:
        tcfg: :class:`pipeline.config.TargetsConfig`, or any object with those four attributes.
    """
    return objective_key(target.latents, tcfg.quantity, tcfg.reduce, target.combine if target.is_combination else None,
                         tcfg.p, tcfg.offset)


@dataclass
class Baseline:
    """Random-prompt statistics of one objective (paper §3.5, eq. 5: z = (a − μ) / σ).

    Attributes:
        objective_key: see :func:`objective_key`. n: prompts. length: tokens per prompt.
        mean / std (ddof 1) / max: of the objective over the prompts, in the objective's units.
    """

    objective_key: str
    n: int
    length: int
    mean: float
    std: float
    max: float
