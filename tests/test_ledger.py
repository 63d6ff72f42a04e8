"""The cost ledger (issue 12 §5) sums what the stages stored, per target and per run."""

from __future__ import annotations

import datetime as dt

import pytest

from reverie.pipeline.store import Store
from reverie.reports.ledger import run_cost, target_cost


def test_ledger_per_target_and_run(tmp_path):
    now = dt.datetime(2026, 1, 1)
    with Store(tmp_path) as st:
        st.insert("units", [
            {"run_id": "r", "target_id": t, "stage": s, "status": "done", "started_at": now, "ended_at": now, "wall_s": w, "error": None}
            for t, s, w in [("7", "dream", 10.0), ("7", "explain", 2.0), ("9", "dream", 5.0), ("*", "scan", 30.0), ("*", "report", 1.0)]])
        st.insert("dream_runs", [
            {"dream_id": f"r/{t}/seed{k}", "run_id": "r", "target_id": t, "seed": k, "objective": "o", "config_json": "{}",
             "n_iterations": 3, "n_candidates": n, "wall_s": 1.0, "created_at": now}
            for t, k, n in [("7", 0, 100), ("7", 1, 50), ("9", 0, 70)]])
        st.insert("llm_calls", [
            {"run_id": "r", "target_id": t, "purpose": "explain:dataset", "key": f"k{i}", "model": "m", "cached": c, "attempts": 1,
             "prompt_tokens": 1000, "completion_tokens": 20, "cost_usd": 0.5 if not c else 0.0, "latency_s": 0.1, "created_at": now}
            for i, (t, c) in enumerate([("7", False), ("7", True), ("9", False)])])
        t7 = target_cost(lambda table, sql, params: st.fetch(sql, params), "r", "7")
        assert t7.stage_s == {"dream": 10.0, "explain": 2.0} and t7.seconds == pytest.approx(12.0)
        assert t7.candidates == 150 and t7.llm_requests == 1 and t7.llm_cached == 1
        assert t7.prompt_tokens == 1000 and t7.completion_tokens == 20 and t7.usd == pytest.approx(0.5)
        total = run_cost(lambda table, sql, params: st.fetch(sql, params), "r", ["7", "9"], None)
        assert total.seconds == pytest.approx(48.0) and total.candidates == 220
        assert total.llm_requests == 2 and total.usd == pytest.approx(1.0) and total.stage_s["scan"] == 30.0
