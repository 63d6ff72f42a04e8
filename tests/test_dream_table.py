"""`reverie dream`'s printed frontier (issue 11 item 4, CLI side): merged count, CE order, start-truncation."""

from __future__ import annotations

import math

from reverie.pipeline.cli import dream_table, ppl, sig
from reverie.stages.dream import merge_results
from reverie.stages.dream.result import DreamPrompt, DreamResult


def _result(seed: int, points: list[tuple[float, float, str]]) -> DreamResult:
    prompts = [DreamPrompt(token_ids=[seed, i], tokens=[text], text=text, activation=a, ce=c, lam=1.0, iteration=i, seed=seed)
               for i, (a, c, text) in enumerate(points)]
    return DreamResult(target_id="7", latents=[7], combine=None, objective_key="pre:last:7", objective="pre-activation of latent 7",
                       seed=seed, seeds=[seed], config={}, frontier=prompts, n_candidates=100, wall_s=1.0)


def _rows(table: str) -> list[str]:
    """The table's data rows (rank, CE, ppl, activation, ...); the header lines are skipped."""
    return [l for l in table.splitlines()[3:] if l[:3].strip().isdigit()]


def test_dream_table_counts_the_merged_frontier_sorts_by_ce_and_keeps_the_last_token():
    long = "x" * 200 + " LAST"
    seed0 = _result(0, [(5.0, 9.0, long), (3.0, 6.0, "mid"), (1.0, 2.0, "fluent\nline")])
    seed1 = _result(1, [(4.0, 9.5, "dominated"), (2.0, 2.5, "best fluent")])   # (4, 9.5) is dominated by (5, 9)
    merged = merge_results([seed0, seed1])
    out = dream_table(merged, n_stored=5, width=40)
    assert "4 prompts on the merged Pareto frontier" in out and "5 stored over 2 seeds" in out
    rows = _rows(out)
    assert len(rows) == len(merged.frontier) == 4
    ces = [float(r.split()[1]) for r in rows]
    assert ces == sorted(ces) == [2.0, 2.5, 6.0, 9.0]                   # most fluent first
    assert rows[-1].rstrip().endswith("LAST") and "…" in rows[-1]     # the start is cut, never the end
    assert "fluent\\nline" in out                                     # newline shown visibly, one line per row
    assert "(ppl)" in out and sig(math.exp(2.0)) in rows[0]           # perplexity next to every CE
    by_act = dream_table(merged, sort="activation")
    first = _rows(by_act)[0]
    assert first.split()[3] == "5"


def test_three_significant_digits():
    assert sig(0.123456) == "0.123" and sig(12345.6) == "1.23e+04" and sig(None) == "—"
    assert ppl(math.log(1234.5)) == "1.23e+03"
