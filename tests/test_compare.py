"""Compare stage on synthetic dreams and scan rows: every metric checked against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from reverie.pipeline.cli import app
from reverie.pipeline.store import Store, now
from reverie.stages.compare import pareto_frontier, run_compare

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
                        "latents": [5, 7, 9], "status": "done", "tokens_seen": 1000, "n_contexts": 10, "window_len": 2,
                        "ce_mean": 5.0, "ce_std": 1.0, "in_dist_threshold": 7.0, "created_at": now(), "updated_at": now()}])
    # latent 5: dataset best 3.0 (CE 6.5), best at CE ≤ 4 is 1.0
    # latent 9: dataset max is negative → ratio undefined; latent 7: no dreams
    s.insert("scan_examples", [_example(5, 0, 3.0, 6.5, " dog"), _example(5, 1, 2.0, 7.5, " cat"), _example(5, 2, 1.0, 3.5, " dog"),
                               _example(9, 0, -0.5, 5.0, " sun"), _example(7, 0, 2.0, 5.0, " tree")])
    s.insert("scan_objective_examples", [{"scan_id": SCAN, "objective_key": "lp(p=0.1,offset=1.0):pre:last:5+9", "rank": 0, "latent": 5,
                                          "source_rank": 0, "window_ids": [1, 2], "window_ce": 6.0, "window_act": 40.0}])
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
    demo_cfg.compare.ce_limit = 4.0  # an absolute limit; the default is the corpus 10th percentile
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

    # dominance: the dataset's best window of 5 is (3.0, CE 6.5); the best dream at CE ≤ 6.5 is (3.5, 6.0)
    assert r["data_best_act"] == 3.0 and r["data_best_ce"] == 6.5 and r["dream_at_data_ce"] == 3.5 and r["dominates"] is True
    assert r["frontier_dominated"] == 1.0 and r["n_data_frontier"] == 2  # frontier (1.0, 3.5), (3.0, 6.5); (2.0, 7.5) is dominated
    assert r["ce_convention"] == "all" and "no stored ce_rest" in " ".join(m["notes"])  # no ce_rest stored: falls back, says so
    assert r7["dominates"] is None and r7["verdict"] == "no dreams"
    assert rc["is_combination"] is True and rc["dominates"] is False and rc["ratio"] is None
    assert [x["latent"] for x in json.loads(rc["metrics_json"])["members"]] == [5, 9]

    s = store.fetch_one("SELECT * FROM compare_summary WHERE run_id = ?", [RUN])
    # batch fractions over single latents only: the combination is never mixed in
    assert s["n_targets"] == 4 and s["n_single"] == 3 and s["frac_beats"] == pytest.approx(1.0) and s["in_dist_threshold"] == 7.0
    assert s["frac_beats_in_dist"] == pytest.approx(1.0)  # 5 yes (3.5 > 3.0), 9 yes (1.0 > -0.5), 7 none
    assert s["n_dominates"] == 2 and s["n_dominance_known"] == 2 and s["ce_convention"] == "all"
    run_compare(demo_cfg, store, RUN, SCAN)  # idempotent
    assert store.fetch_one("SELECT count(*) AS n FROM comparisons")["n"] == 4


def test_compare_cli_prints_the_table(store, tmp_path):
    store.close()
    res = CliRunner().invoke(app, ["compare", "--project-dir", str(tmp_path / "project")])
    assert res.exit_code == 0, res.output
    assert "run-a" in res.output and "scan-x" in res.output and "5+9" in res.output
    assert "a dream dominates the dataset's best window on 2 of 2 single latents" in res.output
    assert "combination" in res.output


# ----------------------------------------------------------------------------- dominance verdicts on hand-built frontiers


def test_dominance_verdict_on_hand_built_frontiers():
    from reverie.stages.compare import V_DOMINATES, V_NO_DATA, V_NO_DREAMS, V_NO_FLUENT_DREAM, V_NOT_DOMINATED, dominance

    data = [(1.0, 3.0), (2.0, 5.0), (3.0, 7.0), (2.5, 8.0)]  # best window (3.0, 7.0); frontier 1.0@3, 2.0@5, 3.0@7
    d = dominance([(3.2, 6.9), (0.5, 2.0)], data)
    assert d["dominates"] is True and d["verdict"] == V_DOMINATES and d["dream_at_data_ce"] == 3.2 and d["data_best_ce"] == 7.0
    assert d["n_data_frontier"] == 3 and d["frontier_dominated"] == pytest.approx(1 / 3)  # only (3.0, 7.0) is dominated
    # equal activation is not higher: no dominance; a higher dream at higher CE does not count either
    d = dominance([(3.0, 6.0), (9.0, 7.1), (2.5, 4.0)], data)
    assert d["dominates"] is False and d["verdict"] == V_NOT_DOMINATED and d["dream_at_data_ce"] == 3.0
    assert d["frontier_dominated"] == pytest.approx(1 / 3)  # (2.5, 4.0) dominates (2.0, 5.0) only
    # equal CE, higher activation dominates ("CE not higher")
    assert dominance([(3.01, 7.0)], data)["dominates"] is True
    # every dream less fluent than the dataset's best window: the dataset wins (FALSE, not NULL)
    d = dominance([(50.0, 7.5)], data)
    assert d["dominates"] is False and d["verdict"] == V_NO_FLUENT_DREAM and d["dream_at_data_ce"] is None and d["frontier_dominated"] == 0.0
    # undecidable states are NULL
    d = dominance([], data)
    assert d["dominates"] is None and d["verdict"] == V_NO_DREAMS and d["data_best_act"] == 3.0 and d["frontier_dominated"] is None
    d = dominance([(1.0, 1.0)], [])
    assert d["dominates"] is None and d["verdict"] == V_NO_DATA and d["data_best_act"] is None


def test_in_distribution_column_null_states():
    from reverie.stages.compare import S_BEATS, S_LOSES, S_NO_DATA_IN, S_NO_DREAM_IN, S_NO_THRESHOLD, in_dist_verdict

    data = [(2.0, 5.0), (4.0, 9.0)]
    assert in_dist_verdict([(3.0, 6.0)], data, 7.0) == (3.0, 2.0, True, S_BEATS)
    assert in_dist_verdict([(1.0, 6.0)], data, 7.0) == (1.0, 2.0, False, S_LOSES)
    # no dream in distribution: NULL, not FALSE or TRUE
    assert in_dist_verdict([(9.0, 8.0)], data, 7.0) == (None, 2.0, None, S_NO_DREAM_IN)
    # no dataset window under the threshold: NULL, never TRUE (the old code said TRUE here)
    assert in_dist_verdict([(1.0, 3.0)], [(4.0, 9.0)], 7.0) == (1.0, None, None, S_NO_DATA_IN)
    assert in_dist_verdict([(1.0, 3.0)], data, None)[2:] == (None, S_NO_THRESHOLD)


def test_compare_uses_ce_rest_matched_lengths_and_bands(demo_cfg, store):
    """CE without the first token when both sides have it; dreams of another length are not compared; band limits from the scan."""
    store.execute("UPDATE scans SET ce_p10 = 4.2, ce_p50 = 5.0, ce_rest_p10 = 3.0, ce_rest_p50 = 4.0, ce_rest_mean = 4.0, "
                  "ce_rest_std = 1.0, ce_rest_in_dist_threshold = 6.0 WHERE scan_id = ?", [SCAN])
    # latent 5's searched frontier: CE both ways
    store.insert("scan_windows", [{"scan_id": SCAN, "objective_key": "pre:last:5", "rank": i, "latent": 5, "source_rank": 0, "context_idx": i,
                                   "end_pos": 5, "window_ids": [1, 2], "tokens": ["a", "b"], "window_ce": ce, "window_ce_rest": rest,
                                   "window_act": act, "latent_acts": None, "frontier_all": True, "frontier_rest": True}
                                  for i, (act, ce, rest) in enumerate([(1.0, 3.5, 2.5), (3.0, 6.5, 5.0)])])
    store.execute("ALTER TABLE dream_prompts ADD COLUMN IF NOT EXISTS ce_rest DOUBLE")
    store.execute("UPDATE dream_prompts SET ce_rest = ce - 1.0")
    # a prompt of another length (3 tokens vs the scan's 2): must be dropped, even though it would win
    run, ps, _ = _dream("5", 7, [(99.0, 1.0)])
    ps[0]["token_ids"], ps[0]["tokens"] = [1, 2, 3], ["x", "y", "z"]
    store.insert("dream_runs", run)
    store.insert("dream_prompts", [{**ps[0], "ce_rest": 0.5}])
    rows = {r["target_id"]: r for r in run_compare(demo_cfg, store, RUN, SCAN)}
    r = rows["5"]
    m = json.loads(r["metrics_json"])
    assert r["ce_convention"] == "rest" and m["n_unmatched_dreams"] == 1 and r["dream_max"] == 5.0
    # rest CEs: data best (3.0, 5.0); dreams (5.0, 7.0), (4.0, 8.0), (2.5, 2.0), (3.5, 5.0), (0.5, 1.0) → best at ≤ 5.0 is 3.5
    assert r["data_best_ce"] == 5.0 and r["dream_at_data_ce"] == 3.5 and r["dominates"] is True
    assert m["ce_limit"] == 3.0 and r["dream_best_ce_limit"] == 2.5 and r["data_best_ce_limit"] == 1.0  # p10 (rest) = 3.0
    assert [b["limit"] for b in m["bands"]] == [3.0, 4.0, 6.0] and m["bands"][0]["perplexity"] == pytest.approx(math.exp(3.0))
    assert r["data_best_in_dist"] == 3.0 and r["dream_best_in_dist"] == 3.5 and r["beats_data_in_dist"] is True
    demo_cfg.compare.ce_convention = "all"
    r = {r["target_id"]: r for r in run_compare(demo_cfg, store, RUN, SCAN)}["5"]
    assert r["ce_convention"] == "all" and r["data_best_ce"] == 6.5 and json.loads(r["metrics_json"])["ce_limit"] == 4.2
