"""The report's read models: plain dataclasses one report page shows, filled by :mod:`reports.data`.

Named apart from the stages' classes they mirror (``*View``: :class:`DreamPromptView` is a stored
row of ``dream_prompts``, not :class:`stages.dream.result.DreamPrompt`). Values keep the store's
units: activations are the objective's value (the SAE latent quantity the targets section chose,
e.g. pre-activation), cross-entropy (CE) is in nats/token, densities are log10 firing frequencies.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from reverie.reports.ledger import Cost
from reverie.sae_targets.spec import Baseline

#: preference order of explanation sources for the index's one-line summary
EXPLANATION_PREFERENCE = ("both", "dataset", "dreams")


@dataclass
class RunInfo:
    """One row of ``runs`` plus what the report derives from it."""

    run_id: str
    kind: str
    status: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    wall_s: float | None
    code_version: str
    config_hash: str
    config: dict[str, Any]
    summary: dict[str, Any]
    neuronpedia_id: str | None = None

    @property
    def config_text(self) -> str:
        """The effective configuration as indented JSON."""
        return json.dumps(self.config, indent=2, sort_keys=True)

    def config_value(self, dotted: str, default: Any = None) -> Any:
        """A value of the run's stored configuration by dotted key ('compare.ce_limit')."""
        cur: Any = self.config
        for k in dotted.split("."):
            if not isinstance(cur, dict) or k not in cur:
                return default
            cur = cur[k]
        return cur


@dataclass
class UnitInfo:
    """One ``units`` row: a stage's outcome for a target ('*' = run-level)."""

    stage: str
    target_id: str
    status: str
    wall_s: float | None
    error: str | None


@dataclass
class AttributionToken:
    """Token attribution at one optimized position (paper Fig. 1).

    ``drop_worst``: activation drop from the worst of the top-k gradient substitutions;
    ``drop_best``: drop from the best alternative (small or negative = the token is replaceable).
    ``replacements``: ``(token, activation)`` pairs, best first.
    """

    position: int
    token: str
    drop_worst: float
    drop_best: float
    replacements: list[tuple[str, float]]


@dataclass
class DreamPromptView:
    """A Pareto-frontier prompt of one EPO seed (``dream_prompts``)."""

    dream_id: str
    seed: int
    idx: int
    tokens: list[str]
    text: str
    activation: float
    ce: float
    perplexity: float
    lam: float | None
    iteration: int
    token_acts: list[float] | None
    latent_acts: list[float] | None
    attribution: list[AttributionToken] | None = None
    ce_rest: float | None = None  # CE without the first token (nats/token), when the dream stage stores it
    n_tokens: int | None = None


@dataclass
class DreamRun:
    """One EPO run (``dream_runs``)."""

    dream_id: str
    seed: int
    objective: str
    n_iterations: int
    n_candidates: int
    wall_s: float
    config: dict[str, Any]
    objective_key: str | None = None
    stop_reason: str | None = None
    objective_scale: str | None = None  # what EPO divided the objective by (dream_runs.objective_scale, migration 0008), when stored


@dataclass
class HistoryPoint:
    """A frontier point recorded at an iteration (``dream_history``), for Fig. 2b."""

    seed: int
    iteration: int
    activation: float
    ce: float


@dataclass
class ExampleView:
    """A dataset example (``scan_examples``) of one latent: shown tokens and their activations."""

    latent: int
    kind: str
    rank: int
    bin: int | None
    tokens: list[str]
    acts: list[float]
    max_act: float
    max_pos: int
    window_ce: float | None
    window_act: float | None
    window_ce_rest: float | None = None


@dataclass
class DataWindow:
    """A searched matched-length dataset window fed alone after BOS (``scan_windows``): on the
    dataset's Pareto frontier under CE over all tokens and/or CE without the first token."""

    tokens: list[str]
    act: float
    ce: float
    ce_rest: float | None
    latent: int
    context_idx: int
    end_pos: int
    latent_acts: list[float] | None
    frontier_all: bool
    frontier_rest: bool


@dataclass
class ScanInfo:
    """A corpus scan (``scans``) the target's dataset side comes from."""

    scan_id: str
    status: str
    tokens_seen: int
    n_contexts: int
    window_len: int | None
    ce_mean: float | None
    ce_std: float | None
    in_dist_threshold: float | None
    corpus: dict[str, Any]
    created_at: dt.datetime | None
    chosen_by: str  # 'comparison' | 'latest covering scan'
    bands: dict[str, dict[str, float | None]] = field(default_factory=dict)  # convention ('all'|'rest') → p10, p50, mean, std, in_dist
    corpus_counts: dict[str, int] = field(default_factory=dict)  # scans.corpus_* (issue 16): documents, bad_lines, no_text, bad_bytes, cleaned_chars

    @property
    def corpus_note(self) -> str | None:
        """What reading the corpus skipped or repaired, e.g. '2,000 documents read; 3 skipped (…)'; None for scans before issue 16."""
        c = self.corpus_counts
        if not c:
            return None
        parts = [f"{c.get('documents', 0):,} documents used"]
        skipped = c.get("bad_lines", 0) + c.get("no_text", 0)
        parts.append(f"{skipped:,} skipped ({c.get('bad_lines', 0):,} unparsable lines, {c.get('no_text', 0):,} without text)")
        parts.append(f"{c.get('bad_bytes', 0):,} invalid UTF-8 bytes replaced")
        parts.append(f"{c.get('cleaned_chars', 0):,} control characters / lone surrogates cleaned")
        return "; ".join(parts)

    @property
    def corpus_label(self) -> str:
        """Where the scan read text: the hub dataset, the local path, or its files' names."""
        c = self.corpus
        if c.get("hf_dataset"):
            return f"{c['hf_dataset']} ({c.get('hf_split', 'train')})"
        if c.get("path"):
            return str(c["path"])
        files = [f.get("path", "") for f in c.get("files", []) if isinstance(f, dict)]
        if files:
            return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return json.dumps(c, sort_keys=True) if c else "unknown corpus"


@dataclass
class LatentScan:
    """What the scan found for one latent: density, histogram, top-k and quantile examples."""

    latent: int
    n_tokens: int | None = None
    n_firing: int | None = None
    density: float | None = None
    max_act: float | None = None
    mean_act: float | None = None
    hist_edges: list[float] | None = None
    hist_counts: list[int] | None = None
    top: list[ExampleView] = field(default_factory=list)
    quantiles: list[ExampleView] = field(default_factory=list)
    window_max: float | None = None  # best matched-length window fed alone (searched)
    n_windows_searched: int | None = None
    n_contexts_searched: int | None = None
    n_short_contexts: int | None = None


@dataclass
class Comparison:
    """Dreams vs dataset for a target (``comparisons``)."""

    scan_id: str
    dream_max: float | None
    data_max: float | None
    ratio: float | None
    dream_best_ce_limit: float | None
    data_best_ce_limit: float | None
    dream_best_in_dist: float | None
    data_best_in_dist: float | None
    dream_z: float | None
    data_z: float | None
    n_beating: int | None
    attribution_overlap: float | None
    beats_data: bool | None
    beats_data_in_dist: bool | None
    metrics: dict[str, Any]
    ce_convention: str | None = None
    data_best_act: float | None = None
    data_best_ce: float | None = None
    dream_at_data_ce: float | None = None
    dream_at_data_ce_ce: float | None = None
    dominates: bool | None = None
    frontier_dominated: float | None = None
    n_data_frontier: int | None = None
    verdict: str | None = None
    in_dist_state: str | None = None
    data_max_in_context: float | None = None
    is_combination: bool | None = None


@dataclass
class ScoreView:
    """A detection score of an explanation (``explain_scores``)."""

    holdout_set: str
    baseline: bool
    metric: str
    value: float
    n: int
    scorer: str = "detection"          # 'detection' | 'fuzzing'
    ci_low: float | None = None        # 95% interval
    ci_high: float | None = None
    n_pos: int | None = None
    n_neg: int | None = None
    n_pos_wanted: int | None = None    # what the settings asked for (more than n_pos: the data held fewer)
    n_neg_wanted: int | None = None
    n_hard_neg: int | None = None


@dataclass
class ExplanationView:
    """An LLM explanation of a target and its scores (``explanations``)."""

    explanation_id: str
    source: str
    model: str
    text: str
    scores: list[ScoreView]

    def score_table(self) -> list[dict[str, Any]]:
        """Rows ``{holdout_set, metric, value, baseline, n}``: this explanation's score and the
        score of another latent's explanation on the same held-out set (None when absent)."""
        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for s in self.scores:
            r = rows.setdefault((s.holdout_set, s.scorer, s.metric), {
                "holdout_set": s.holdout_set, "scorer": s.scorer, "metric": s.metric, "value": None, "baseline": None, "n": s.n,
                "ci": None, "baseline_ci": None, "n_pos": None, "n_neg": None, "wanted": None, "n_hard_neg": None, "short": False})
            r["baseline" if s.baseline else "value"] = s.value
            r["baseline_ci" if s.baseline else "ci"] = (s.ci_low, s.ci_high) if s.ci_low is not None else None
            if not s.baseline:
                r.update(n=s.n, n_pos=s.n_pos, n_neg=s.n_neg, n_hard_neg=s.n_hard_neg,
                         wanted=(s.n_pos_wanted, s.n_neg_wanted) if s.n_pos_wanted else None,
                         short=bool(s.n_pos_wanted and ((s.n_pos or 0) < s.n_pos_wanted or (s.n_neg or 0) < (s.n_neg_wanted or 0))))
        return [rows[k] for k in sorted(rows)]


@dataclass
class TargetData:
    """Everything one latent (or combination) page shows."""

    target_id: str
    latents: list[int]
    combine: str | None
    log10_density: list[float | None]
    density_source: str | None
    model_key: str
    sae_key: str
    hook_name: str
    units: list[UnitInfo] = field(default_factory=list)
    dream_runs: list[DreamRun] = field(default_factory=list)
    prompts: list[DreamPromptView] = field(default_factory=list)  # all seeds; order_dreams: winners by CE, then the rest by CE
    history: list[HistoryPoint] = field(default_factory=list)
    comparison: Comparison | None = None
    scan: ScanInfo | None = None
    latent_scans: list[LatentScan] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    objective_windows: list[tuple[float, float]] = field(default_factory=list)  # combination: (window CE, objective) of dataset windows
    data_windows: list[DataWindow] = field(default_factory=list)  # the searched dataset frontier of the target's objective
    explanations: list[ExplanationView] = field(default_factory=list)
    explain_failures: list[tuple[str, str]] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)               # reports.ledger: seconds, candidates, LLM tokens and USD
    extra_seeds: list[tuple[int | None, str, str]] = field(default_factory=list)  # (seed, status, reason) of the budget allocation

    @property
    def seed_spread(self) -> tuple[int, float, float] | None:
        """(seeds, lowest and highest best activation over them) of the merged frontier; None without dreams."""
        best: dict[int, float] = {}
        for p in self.prompts:
            best[p.seed] = max(best.get(p.seed, float("-inf")), p.activation)
        return (len(best), min(best.values()), max(best.values())) if best else None

    @property
    def is_combination(self) -> bool:
        return len(self.latents) > 1

    @property
    def dream_max(self) -> float | None:
        """Comparison's dream max, else the best frontier activation, else None."""
        if self.comparison and self.comparison.dream_max is not None:
            return self.comparison.dream_max
        return max((p.activation for p in self.prompts), default=None)

    @property
    def data_max(self) -> float | None:
        """Comparison's dataset max (window fed alone); None without a comparison."""
        return self.comparison.data_max if self.comparison else None

    def unit(self, stage: str) -> UnitInfo | None:
        """This target's unit of a stage, else the run-level ('*') one."""
        own = [u for u in self.units if u.stage == stage and u.target_id == self.target_id]
        run = [u for u in self.units if u.stage == stage and u.target_id == "*"]
        return (own or run or [None])[0]

    def summary_explanation(self) -> ExplanationView | None:
        """The explanation shown on the index (source order: both, dataset, dreams)."""
        for src in EXPLANATION_PREFERENCE:
            for e in self.explanations:
                if e.source == src:
                    return e
        return self.explanations[0] if self.explanations else None


@dataclass
class CompareSummary:
    """Batch summary of the compare stage (``compare_summary``)."""

    n_targets: int
    frac_beats: float | None
    frac_beats_in_dist: float | None
    ce_mean: float | None
    ce_std: float | None
    in_dist_threshold: float | None
    ce_convention: str | None = None
    n_single: int | None = None
    n_dominance_known: int | None = None
    n_dominates: int | None = None
    frac_dominates: float | None = None
    ce_p10: float | None = None
    ce_p50: float | None = None


@dataclass
class RunData:
    """A whole run: its metadata, every target, and the batch summary."""

    run: RunInfo
    targets: list[TargetData]
    compare_summary: CompareSummary | None
    units: list[UnitInfo]
    failures: list[tuple[str, str]] = field(default_factory=list)  # run-level explain failures (what, why)
    cost: Cost = field(default_factory=Cost)                     # the run's total (every target + run-level units)
