"""Active compute allocation inside run.budget_s (issue 15 §3): extra seeds go to the targets that
lost to the dataset or were still improving, first; converged ones get none; the run stays within
the budget plus one unit; every planned unit is recorded with its reason."""

from __future__ import annotations

import time

from reverie.pipeline.allocation import plan_extra_seeds, seed_spread
from reverie.pipeline.config import load_config
from reverie.pipeline.orchestrate import run_nightly
from reverie.pipeline.store import Store

DEMO = "configs/demo.toml"
TINY = {
    "targets.n_random": 2, "targets.seed": 5, "targets.combinations": [[35, 85]],
    "dream.iterations": 8, "dream.population": 4, "dream.children": 8, "dream.topk": 64, "dream.history_every": 2,
    "dream.restart_every": 4, "dream.seeds": [0], "dream.attribution_prompts": 0,
    "scan.max_tokens": 4000, "scan.batch_size": 8, "scan.top_k": 8, "scan.window_ce_samples": 64, "scan.baseline_prompts": 64,
    "explain.enabled": False, "run.torch_threads": 1,
}


def test_extra_seeds_go_to_non_converged_targets_first_within_budget(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    budget = 240.0
    cfg = load_config(repo / DEMO, {**TINY, "project.dir": str(tmp_path / "p"), "run.budget_s": budget, "run.max_extra_seeds": 1})
    t = time.time()
    s = run_nightly(cfg, run_id="nightly-budget")
    wall = time.time() - t
    assert s.exit_code == 0, s.failures
    with Store(tmp_path / "p", read_only=True) as st:
        rows = st.fetch("SELECT * FROM extra_seeds WHERE run_id = 'nightly-budget' ORDER BY created_at")
        targets = [r["target_id"] for r in st.fetch("SELECT target_id FROM targets WHERE run_id = 'nightly-budget'")]
        plan, skipped = plan_extra_seeds(st, "nightly-budget", targets, cfg.run.improving_min, 1)
        assert {r["target_id"] for r in rows} == set(targets)                   # every target has a recorded decision
        ran = [r for r in rows if r["status"] == "done"]
        for r in rows:
            assert r["reason"]
            if r["status"] == "skipped":
                assert r["reason"].startswith("converged") and r["seed"] is None
        for r in ran:                                                            # the extra seed's dreams are stored
            assert st.fetch_one("SELECT 1 AS x FROM dream_runs WHERE run_id = 'nightly-budget' AND target_id = ? AND seed = ?",
                                [r["target_id"], r["seed"]])
            assert "lost to the dataset" in r["reason"] or "still rose" in r["reason"]
        # non-converged first: units ran in descending priority
        prios = [r["priority"] for r in ran]
        assert prios == sorted(prios, reverse=True)
        if ran:
            spread = seed_spread(st, "nightly-budget", ran[0]["target_id"])
            assert spread["seeds"] == 2 and spread["min"] <= spread["max"]
        longest = max([float(u["wall_s"] or 0) for u in st.fetch("SELECT wall_s FROM units WHERE run_id = 'nightly-budget' AND stage = 'dream'")]
                      + [float(r["wall_s"] or 0) for r in ran] + [0.0])
    assert wall <= budget + longest + 60          # + report/atlas after the allocation


def test_a_tiny_budget_runs_no_extra_seed(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / DEMO, {**TINY, "project.dir": str(tmp_path / "p"), "run.budget_s": 1.0})
    s = run_nightly(cfg, run_id="nightly-tiny")
    assert s.exit_code == 0, s.failures
    with Store(tmp_path / "p", read_only=True) as st:
        rows = st.fetch("SELECT status FROM extra_seeds WHERE run_id = 'nightly-tiny'")
    assert rows and all(r["status"] in ("budget", "skipped") for r in rows)


def test_plan_orders_lost_then_improving_and_skips_converged(tmp_path):
    """Synthetic run: 'a' lost to the dataset, 'b' still rose 20% in its last 20% of iterations,
    'c' converged (+0.1%): plan = a, then b; c is skipped with its reason."""
    import datetime as dt

    now = dt.datetime(2026, 1, 1)
    with Store(tmp_path) as st:
        st.insert("dream_runs", [{"dream_id": f"r/{t}/seed0", "run_id": "r", "target_id": t, "seed": 0, "objective": "o",
                                  "config_json": "{}", "n_iterations": 100, "n_candidates": 1, "wall_s": 1.0, "created_at": now}
                                 for t in "abc"])
        hist = {"a": [(50, 1.0), (75, 1.0), (100, 1.0)], "b": [(50, 1.0), (75, 1.0), (100, 1.2)], "c": [(50, 1.0), (75, 1.0), (100, 1.001)]}
        st.insert("dream_history", [{"dream_id": f"r/{t}/seed0", "iteration": it, "activation": a, "ce": 5.0}
                                    for t, pts in hist.items() for it, a in pts])
        st.insert("comparisons", [{"run_id": "r", "target_id": t, "scan_id": "s", "dominates": t != "a"} for t in "abc"])
        plan, skipped = plan_extra_seeds(st, "r", ["c", "b", "a"], improving_min=0.01, max_extra=2)
    assert [(e.target_id, e.seed) for e in plan] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert "lost" in plan[0].reason and "+20.0%" in plan[2].reason
    assert skipped == [("c", "converged (+0.1% in the last 20% of iterations)")]
