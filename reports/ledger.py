"""The cost ledger (issue 12 §5): what each latent and each stage of a run spent.

Read only from rows the stages already store — ``units`` (wall seconds per unit: a dream unit's
is its share of the batched search), ``dream_runs`` (EPO candidates evaluated), ``scans`` (corpus
tokens) and ``llm_calls`` (requests, tokens, estimated USD) — so it costs nothing to keep. The
scan is shared by every target of the run; it is reported once, per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cost:
    """Spending of one target (or, summed, of a run).

    Attributes:
        stage_s: wall seconds per stage ('dream', 'explain', …) on the run's device.
        candidates: EPO prompts evaluated (all seeds).
        scan_tokens: corpus tokens the scan read (run level: shared by every target).
        llm_requests / llm_cached: requests paid for / answered from the cache.
        prompt_tokens / completion_tokens: LLM tokens of the paid requests.
        usd: estimated LLM cost (``explain.price_per_mtok_*``).
    """

    stage_s: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    scan_tokens: int = 0
    llm_requests: int = 0
    llm_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    @property
    def seconds(self) -> float:
        """Wall seconds over every stage."""
        return float(sum(self.stage_s.values()))

    def add(self, other: "Cost") -> "Cost":
        """The sum of two ledgers (a new object)."""
        stages = dict(self.stage_s)
        for k, v in other.stage_s.items():
            stages[k] = stages.get(k, 0.0) + v
        return Cost(stage_s=stages, candidates=self.candidates + other.candidates, scan_tokens=self.scan_tokens + other.scan_tokens,
                    llm_requests=self.llm_requests + other.llm_requests, llm_cached=self.llm_cached + other.llm_cached,
                    prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                    completion_tokens=self.completion_tokens + other.completion_tokens, usd=self.usd + other.usd)


def target_cost(rows: Any, run_id: str, target_id: str) -> Cost:
    """One target's spending in a run.

    Args:
        rows: ``rows(table, sql, params) -> list[dict]`` (the report reader: tolerates missing tables).
    """
    c = Cost()
    for u in rows("units", "SELECT stage, SUM(wall_s) AS s FROM units WHERE run_id = ? AND target_id = ? GROUP BY stage", [run_id, target_id]):
        c.stage_s[u["stage"]] = float(u["s"] or 0.0)
    d = rows("dream_runs", "SELECT SUM(n_candidates) AS n FROM dream_runs WHERE run_id = ? AND target_id = ?", [run_id, target_id])
    c.candidates = int(d[0]["n"] or 0) if d else 0
    _llm(rows, c, "SELECT cached, prompt_tokens, completion_tokens, cost_usd FROM llm_calls WHERE run_id = ? AND target_id = ?", [run_id, target_id])
    return c


def run_cost(rows: Any, run_id: str, target_ids: list[str], scan_id: str | None) -> Cost:
    """A run's spending: every target's, plus its run-level units (scan, compare, report, …),
    the scan's corpus tokens and run-level LLM calls."""
    total = Cost()
    for t in target_ids:
        total = total.add(target_cost(rows, run_id, t))
    run_level = Cost()
    for u in rows("units", "SELECT stage, SUM(wall_s) AS s FROM units WHERE run_id = ? AND target_id = '*' GROUP BY stage", [run_id]):
        run_level.stage_s[u["stage"]] = float(u["s"] or 0.0)
    if scan_id:
        s = rows("scans", "SELECT tokens_seen FROM scans WHERE scan_id = ?", [scan_id])
        run_level.scan_tokens = int(s[0]["tokens_seen"] or 0) if s else 0
    _llm(rows, run_level, "SELECT cached, prompt_tokens, completion_tokens, cost_usd FROM llm_calls WHERE run_id = ? AND (target_id IS NULL OR target_id = '*')", [run_id])
    return total.add(run_level)


def _llm(rows: Any, c: Cost, sql: str, params: list[Any]) -> None:
    for r in rows("llm_calls", sql, params):
        if r["cached"]:
            c.llm_cached += 1
            continue
        c.llm_requests += 1
        c.prompt_tokens += int(r["prompt_tokens"] or 0)
        c.completion_tokens += int(r["completion_tokens"] or 0)
        c.usd += float(r["cost_usd"] or 0.0)
