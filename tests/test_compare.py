"""Compare stage on synthetic dreams and scan rows: every metric checked against hand-computed values."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import Store, now
from stages.compare import pareto_frontier, run_compare

RUN, SCAN = "run-a", "scan-x"


def _example(latent: int, rank: int, act: float, ce: float, max_token: str) -> dict:
    return {"scan_id": SCAN, "latent": latent, "kind": "top", "rank": rank, "bin": None, "context_idx": rank, "start": 1,
            "token_ids": [10, 11, 12], "tokens": ["a", max_token, "c"], "acts": [0.0, act, 0.0], "post_acts": [0.0, act, 0.0],
            "max_act": act + 0.5, "max_pos": 1, "window_ids": [10, 11], "window_ce": ce, "window_act": act}


def _dream(target: str, seed: int, prompts: list[tuple[float, float]], attributions: list[tuple[int, str, float]] = ()) -> tuple[list, list, list]:
    did = f"{RUN}/{target}/seed{seed}"
    run = {"dream_id": did, "run_id": RUN, "target_id": target, "seed": seed, "objective": "x", "config_json": "{}",
           "n_iterations": 10, "n_candidates": 100, "wall_s": 1.0, "created_at": now()}
    ps = [{"dream_id": did, "idx": i, "token_ids": [1, 2], "tokens": ["x", "y"], "text": f"p{i}", "activation": a, "ce": c,
           "perplexity": 2.718 ** c, "lam": 1.0, "iteration": i, "token_acts": [0.0, a], "latent_acts": [a]} for i, (a, c) in enumerate(prompts)]
    at = [{"dream_id": did, "idx": 0, "position": pos, "token_id": pos, "token": tok, "drop_worst": 1.0, "drop_best": db,
           "replacements_json": "[]"} for pos, tok, db in attributions]
    return [run], ps, at


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "project")
    s.start_run(RUN, "dream", "{}", "h")
    tgt = lambda tid, lats, comb: {"run_id": RUN, "target_id": tid, "model_key": "m", "sae_key": "s", "hook_name": "h",  # noqa: E731
                                   "latents": lats, "combine": comb, "log10_density": [-2.0] * len(lats), "density_source": "x"}
    s.insert("targets", [tgt("5", [5], None), tgt("9", [9], None), tgt("7", [7], None), tgt("5+9", [5, 9], "lp")])
    s.insert("scans", [{"scan_id": SCAN, "model_key": "m", "sae_key": "s", "hook_name": "h", "corpus_json": "{}", "settings_json": "{}",
                        "latents": [5, 7, 9], "status": "done", "tokens_seen": 1000, "n_contexts": 10, "window_len": 12,
                        "ce_mean": 5.0, "ce_std": 1.0, "in_dist_threshold": 7.0, "created_at": now(), "updated_at": now()}])
    # latent 5: dataset best 3.0 (CE 6.5), best at CE ≤ 4 is 1.0
    # latent 9: dataset max is negative → ratio undefined; latent 7: no dreams
    s.insert("scan_examples", [_example(5, 0, 3.0, 6.5, " dog"), _example(5, 1, 2.0, 7.5, " cat"), _example(5, 2, 1.0, 3.5, " dog"),
                               _example(9, 0, -0.5, 5.0, " sun"), _example(7, 0, 2.0, 5.0, " tree")])
    s.insert("scan_objective_examples", [{"scan_id": SCAN, "objective_key": "lp(p=0.1,offset=1.0):pre:last:5+9", "rank": 0, "latent": 5,
                                          "source_rank": 0, "window_ids": [1], "window_ce": 6.0, "window_act": 40.0}])
    s.insert("baselines", [{"scan_id": SCAN, "objective_key": k, "n": 1024, "length": 12, "mean": m, "std": sd, "max": 1.0}
                           for k, m, sd in [("pre:last:5", -1.0, 0.5), ("pre:last:9", 0.0, 1.0), ("pre:last:7", 0.0, 0.0)]])
    # target 5: two seeds; (4.0, 9.0) is dominated by (5.0, 8.0), so it is not on the merged frontier
    r1, p1, a1 = _dream("5", 0, [(5.0, 8.0), (4.0, 9.0), (2.5, 3.0)], [(0, " Dog", 2.0), (1, " ran", 1.6), (2, " cat", 0.5)])
    r2, p2, a2 = _dream("5", 1, [(3.5, 6.0), (0.5, 2.0)])
    r3, p3, _ = _dream("9", 0, [(1.0, 5.0)])
    r4, p4, _ = _dream("5+9", 0, [(30.0, 5.0)])
    s.insert("dream_runs", r1 + r2 + r3 + r4)
    s.insert("dream_prompts", p1 + p2 + p3 + p4)
    s.insert("dream_attributions", a1 + a2)
    yield s
    s.close()


def test_pareto_frontier():
    pts = [(5.0, 8.0), (4.0, 9.0), (2.5, 3.0), (3.5, 6.0), (0.5, 2.0), (3.5, 6.0)]
    assert pareto_frontier(pts) == [4, 2, 3, 0]


def test_compare_metrics_on_synthetic_dreams(demo_cfg, store):
    demo_cfg.compare.attribution_top_tokens = 2
    rows = {r["target_id"]: r for r in run_compare(demo_cfg, store, RUN, SCAN)}
    r = rows["5"]
    assert r["dream_max"] == 5.0 and r["data_max"] == 3.0 and r["ratio"] == pytest.approx(5 / 3)
    assert r["dream_best_ce_limit"] == 2.5 and r["data_best_ce_limit"] == 1.0  # CE ≤ 4
    assert r["dream_best_in_dist"] == 3.5 and r["data_best_in_dist"] == 3.0  # CE ≤ 7 = 5 + 2·1
    assert r["dream_z"] == pytest.approx((5.0 + 1.0) / 0.5) and r["data_z"] == pytest.approx((3.0 + 1.0) / 0.5)
    assert r["n_beating"] == 2  # frontier points 5.0 and 3.5 beat 3.0; the dominated 4.0 is not counted
    assert r["attribution_overlap"] == pytest.approx(0.5)  # top-2 attributed {dog, ran}; dataset max tokens {dog, cat}
    m = json.loads(r["metrics_json"])
    assert m["n_seeds"] == 2 and m["n_prompts"] == 5 and m["n_frontier"] == 4 and m["n_beating_all_prompts"] == 3
    assert m["attribution_tokens"] == ["dog", "ran"] and m["data_max_tokens"] == ["cat", "dog"]
    assert r["beats_data"] is True and r["beats_data_in_dist"] is True

    r9 = rows["9"]
    assert r9["data_max"] == -0.5 and r9["ratio"] is None and r9["n_beating"] == 1 and r9["beats_data"] is True
    assert "ratio undefined" in " ".join(json.loads(r9["metrics_json"])["notes"])
    r7 = rows["7"]  # no dreams: dream fields NULL, dataset side present, σ = 0 → no z
    assert r7["dream_max"] is None and r7["n_beating"] is None and r7["beats_data"] is None and r7["data_max"] == 2.0
    assert r7["data_z"] is None
    rc = rows["5+9"]  # combination: dataset side from the combination objective on its latents' top windows
    assert rc["data_max"] == 40.0 and rc["dream_max"] == 30.0 and rc["beats_data"] is False and rc["dream_z"] is None

    s = store.fetch_one("SELECT * FROM compare_summary WHERE run_id = ?", [RUN])
    assert s["n_targets"] == 4 and s["frac_beats"] == pytest.approx(2 / 3) and s["in_dist_threshold"] == 7.0
    assert s["frac_beats_in_dist"] == pytest.approx(2 / 3)  # 5 yes, 9 yes (1.0 > -0.5), 5+9 no (30 < 40), 7 none
    run_compare(demo_cfg, store, RUN, SCAN)  # idempotent
    assert store.fetch_one("SELECT count(*) AS n FROM comparisons")["n"] == 4


def test_compare_cli_prints_the_table(store, tmp_path):
    store.close()
    res = CliRunner().invoke(app, ["compare", "--project-dir", str(tmp_path / "project")])
    assert res.exit_code == 0, res.output
    assert "run-a" in res.output and "scan-x" in res.output and "5+9" in res.output
    assert "dreaming beats the dataset on 67% of targets" in res.output
