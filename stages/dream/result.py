"""Plain, picklable results of the dream stage (no tensors): what a Ray worker returns and the
driver writes with :func:`stages.dream.stage.write_dream`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Replacement:
    """One evaluated substitution of token attribution (paper Fig. 1)."""

    token_id: int
    token: str
    activation: float        # objective f(t) with the substitution


@dataclass
class PositionAttribution:
    """Causal attribution of one optimized position (Thompson et al. 2024, Fig. 1).

    Attributes:
        position: index among the optimized tokens (0-based).
        token_id / token: the prompt's token there.
        drop_worst: f(t) − min over substitutions (colour in Fig. 1; large = some token kills it).
        drop_best: f(t) − max over substitutions (bar height; large = every substitution hurts).
        replacements: the evaluated top-k gradient substitutions, activation descending.
    """

    position: int
    token_id: int
    token: str
    drop_worst: float
    drop_best: float
    replacements: list[Replacement]


@dataclass
class DreamPrompt:
    """One Pareto-frontier prompt.

    Attributes:
        token_ids: optimized tokens only (no BOS / prefix / suffix).
        tokens: each id decoded alone; text: the ids decoded together.
        activation: objective f(t) (units of the read quantity).
        ce: mean next-token cross-entropy over the optimized tokens, nats/token (the first
            token scored given BOS/prefix).
        ce_rest: the same mean without the first optimized token (the reference code's
            convention: a window cut from a document pays for its cut only in the first term).
        lam: λ of the population slot whose member proposed it (NULL-able).
        iteration: iteration at which it was first evaluated (0 = initial population).
        seed: EPO seed of the run that found it.
        token_acts: the objective's per-token value at each optimized position (combined over
            latents for a combination).
        latent_acts: each latent's value at the read position (last token, or the argmax
            position for reduce='max').
    """

    token_ids: list[int]
    tokens: list[str]
    text: str
    activation: float
    ce: float
    lam: float | None
    iteration: int
    seed: int
    ce_rest: float | None = None
    token_acts: list[float] = field(default_factory=list)
    latent_acts: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        """exp(ce)."""
        import math

        return math.exp(self.ce)


@dataclass
class FrontierSnapshot:
    """The Pareto frontier after one iteration (paper Fig. 2b). Lists are aligned."""

    seed: int
    iteration: int
    activation: list[float]
    ce: list[float]


@dataclass
class RestartEvent:
    """One restart (paper §2): λ_r drawn, the member optimal under L_λr kept."""

    iteration: int
    lam_r: float
    kept_slot: int
    population_activation: list[float]
    population_ce: list[float]


@dataclass
class DreamResult:
    """Result of EPO for one target and one seed (or several seeds merged).

    Attributes:
        target_id / latents / combine: what was dreamed on.
        objective_key / objective: :attr:`Objective.key` and its human description.
        seed: the EPO seed; None for a merged result (see ``seeds``).
        seeds: every seed that contributed.
        config: the EPO configuration (JSON-able dict).
        frontier: Pareto frontier over every candidate evaluated, activation descending.
        history: frontier snapshots every ``history_every`` iterations and at the end.
        attributions: token attribution per prompt, keyed by the frontier prompt's token ids.
        restarts: restart events.
        n_iterations / n_candidates / wall_s: iterations run, prompts evaluated, seconds.
        timing: seconds spent in 'gradient', 'proposal', 'evaluation', 'selection'.
        stop_reason: 'iterations' | 'time_budget' | 'early_stop'.
        objective_scale: what EPO divided f by ('z', 'dataset_max', 'raw') and ``scale`` its value
            (in the objective's units); the frontier's values are unscaled.
        batch_jobs: how many (target, seed) populations shared this run's batched search;
            ``wall_s`` and ``timing`` are this job's share (batch time / batch_jobs).
    """

    target_id: str
    latents: list[int]
    combine: str | None
    objective_key: str
    objective: str
    seed: int | None
    seeds: list[int]
    config: dict[str, Any]
    frontier: list[DreamPrompt]
    history: list[FrontierSnapshot] = field(default_factory=list)
    attributions: dict[tuple[int, ...], list[PositionAttribution]] = field(default_factory=dict)
    restarts: list[RestartEvent] = field(default_factory=list)
    n_iterations: int = 0
    n_candidates: int = 0
    wall_s: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    stop_reason: str = "iterations"
    objective_scale: str = "raw"
    scale: float = 1.0
    batch_jobs: int = 1

    @property
    def best(self) -> DreamPrompt:
        """The highest-activation frontier prompt."""
        return max(self.frontier, key=lambda p: p.activation)

    @property
    def candidates_per_s(self) -> float:
        return self.n_candidates / self.wall_s if self.wall_s > 0 else float("nan")

    def frontier_table(self, order: str = "ce") -> list[dict[str, Any]]:
        """The frontier as plain rows (text, activation, CE and CE without the first token in
        nats/token, perplexity, λ, iteration, seed, token ids), most fluent first (``order='ce'``)
        or highest activation first (``'activation'``).

        Raises:
            ValueError: unknown ``order``.
        """
        if order not in ("ce", "activation"):
            raise ValueError(f"order {order!r}: use 'ce' or 'activation'")
        key = (lambda p: (p.ce, -p.activation)) if order == "ce" else (lambda p: (-p.activation, p.ce))
        return [{"text": p.text, "activation": p.activation, "ce": p.ce, "ce_rest": p.ce_rest, "perplexity": p.perplexity,
                 "lam": p.lam, "iteration": p.iteration, "seed": p.seed, "token_ids": list(p.token_ids)}
                for p in sorted(self.frontier, key=key)]

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able plain data (attribution keys become the prompts' token-id lists)."""
        from dataclasses import asdict

        d = asdict(self)
        d["attributions"] = [{"token_ids": list(k), "positions": [asdict(a) for a in v]} for k, v in self.attributions.items()]
        return d

    def to_pandas(self):
        """:meth:`frontier_table` as a ``pandas.DataFrame`` (pandas comes with ``datasets``)."""
        import pandas as pd

        return pd.DataFrame(self.frontier_table())

    def plot(self, path: str | None = None, ax: Any = None) -> Any:
        """Activation vs cross-entropy of the frontier (the paper's Fig. 3, dreams only), one colour
        per seed; saved to ``path`` when given. Returns the matplotlib Axes."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
        for seed in sorted({p.seed for p in self.frontier}):
            pts = sorted((p.ce, p.activation) for p in self.frontier if p.seed == seed)
            ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", ms=3, label=f"seed {seed}")
        ax.set_xlabel("cross-entropy (nats/token)")
        ax.set_ylabel("activation")
        ax.set_title(f"target {self.target_id}: {self.objective}", fontsize=9)
        ax.legend(fontsize=8)
        if path is not None:
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        return ax
