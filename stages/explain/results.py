"""What the explain stage produces (:mod:`stages.explain.stage`): plain dataclasses, picklable,
written by :func:`stages.explain.store.write_explain`."""

from __future__ import annotations

from dataclasses import dataclass, field

from reverie.stages.explain.client import CallRecord
from reverie.stages.explain.scoring import DetectionMetrics


@dataclass
class Explanation:
    """One drafted explanation (a row of ``explanations``)."""

    explanation_id: str
    target_id: str
    source: str
    text: str
    raw_text: str | None  # None: the whole answer is stored once, in llm_cache (key = prompt_hash)
    prompt_hash: str
    n_dataset: int
    n_dreams: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Score:
    """Detection metrics of one explanation (or its baseline) on one held-out set."""

    target_id: str
    explanation_id: str
    scored_explanation_id: str
    holdout_set: str
    baseline: bool
    metrics: DetectionMetrics
    scorer: str = "detection"                 # 'detection' | 'fuzzing' (delphi)
    intervals: dict[str, tuple[float | None, float | None, str]] = field(default_factory=dict)  # metric -> 95% CI (lo, hi, method)
    wanted: tuple[int, int] = (0, 0)          # held-out (activating, non-activating) the settings asked for
    n_hard_neg: int = 0                       # labelled negatives from hard-negative contexts
    n_requests: int = 0                       # scoring requests behind the values


@dataclass
class Failure:
    """Something the stage could not do for a target ('*': the whole run), and why (redacted)."""

    target_id: str
    what: str
    why: str


@dataclass
class ExplainResult:
    """Everything :func:`compute_explain` produced for a run (plain data: picklable)."""

    run_id: str
    scan_id: str | None
    model: str
    n_targets: int
    explanations: list[Explanation] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    stopped: str | None = None


@dataclass
class ExplainSummary:
    """What :func:`run_explain` did, for the CLI and the nightly summary (tokens; cost in USD)."""

    run_id: str | None
    scan_id: str | None
    model: str
    skipped: bool
    message: str
    n_targets: int = 0
    n_explanations: int = 0
    n_scores: int = 0
    n_failures: int = 0
    n_requests: int = 0
    n_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    stopped: str | None = None
    wall_s: float = 0.0
