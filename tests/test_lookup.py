"""pipeline.lookup: one rule for the latest run and for the scan serving a run, used by the CLI's
compare and report, the explain stage and the report's pages."""

from __future__ import annotations

import datetime as dt

import pytest

from reverie.pipeline.lookup import BY_COMPARISON, BY_COVERAGE, latest_run, scan_choice, scan_for
from reverie.pipeline.store import Store, now

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def _run(store: Store, run_id: str, minutes: int) -> None:
    store.start_run(run_id, "dream", "{}", "h")
    store.execute("UPDATE runs SET started_at = ? WHERE run_id = ?", [T0 + dt.timedelta(minutes=minutes), run_id])


def _target(run_id: str, tid: str, latents: list[int], model: str = "model-b") -> dict:
    return {"run_id": run_id, "target_id": tid, "model_key": model, "sae_key": "sae", "hook_name": "blocks.1.hook_resid_post",
            "latents": latents, "combine": "lp" if len(latents) > 1 else None, "log10_density": [-2.0] * len(latents),
            "density_source": "x"}


def _scan(scan_id: str, model: str, latents: list[int], minutes: int, status: str = "done") -> dict:
    return {"scan_id": scan_id, "model_key": model, "sae_key": "sae", "hook_name": "blocks.1.hook_resid_post", "corpus_json": "{}",
            "settings_json": "{}", "latents": latents, "status": status, "tokens_seen": 10, "n_contexts": 1, "window_len": 2,
            "ce_mean": 5.0, "ce_std": 1.0, "in_dist_threshold": 7.0, "created_at": now(),
            "updated_at": T0 + dt.timedelta(minutes=minutes)}


def _dream_run(run_id: str, tid: str) -> dict:
    return {"dream_id": f"{run_id}/{tid}/seed0", "run_id": run_id, "target_id": tid, "seed": 0, "objective": "x", "config_json": "{}",
            "n_iterations": 1, "n_candidates": 1, "wall_s": 1.0, "created_at": now()}


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "p")
    _run(s, "run-old", 0)      # targets and dreams
    _run(s, "run-new", 10)     # targets only
    _run(s, "run-empty", 20)   # nothing
    s.insert("targets", [_target("run-old", "5", [5]), _target("run-old", "5+9", [5, 9]), _target("run-new", "7", [7])])
    s.insert("dream_runs", [_dream_run("run-old", "5")])
    # two models' scans with the same SAE key and hook point: model A's is the newest and covers the latents
    s.insert("scans", [_scan("scan-b-old", "model-b", [5, 9], 1), _scan("scan-b", "model-b", [5, 7, 9], 5),
                       _scan("scan-a", "model-a", [5, 7, 9], 30), _scan("scan-b-running", "model-b", [5, 7, 9], 40, status="running"),
                       _scan("scan-b-only5", "model-b", [5], 50)])
    yield s
    s.close()


def test_latest_run_by_what_it_has(store):
    assert latest_run(store) == "run-empty"
    assert latest_run(store, having="targets") == "run-new"
    assert latest_run(store, having="dreams") == "run-old"
    with pytest.raises(ValueError, match="having"):
        latest_run(store, having="scans")


def test_latest_run_on_an_empty_store_and_ties(tmp_path):
    with Store(tmp_path / "e") as s:
        assert latest_run(s) is None and latest_run(s, having="dreams") is None
        _run(s, "run-a", 0)
        _run(s, "run-b", 0)   # same start time: the larger run id
        assert latest_run(s) == "run-b"


def test_scan_for_never_takes_another_models_scan(store):
    """The old compare rule (``scan_for_run``: newest done scan of the same SAE key and hook point)
    ignored model_key and picked model A's newer scan for model B's run."""
    old_rule = store.fetch_one("SELECT scan_id FROM scans WHERE status = 'done' AND sae_key = ? AND hook_name = ? "
                               "AND list_has_all(latents, [5, 9]) ORDER BY updated_at DESC LIMIT 1", ["sae", "blocks.1.hook_resid_post"])
    assert old_rule["scan_id"] == "scan-a"   # the bug this module fixes
    assert scan_choice(store, "run-old") == scan_choice(store, "run-old", latents=[9, 5])
    assert scan_for(store, "run-old") == "scan-b"            # model B's newest finished scan covering 5 and 9
    assert scan_choice(store, "run-old").chosen_by == BY_COVERAGE
    assert scan_for(store, "run-new") == "scan-b"            # covers 7
    # a target asks only for its own latents: the newest finished scan holding latent 5
    assert scan_for(store, "run-old", target_id="5") == "scan-b-only5"
    assert scan_for(store, "run-old", target_id="5+9") == "scan-b"
    assert scan_for(store, "run-old", latents=[1234]) is None
    assert scan_for(store, "run-empty") is None and scan_for(store, "no-such-run") is None


def test_the_comparisons_scan_comes_first(store):
    store.insert("comparisons", [{"run_id": "run-old", "target_id": "5+9", "scan_id": "scan-b-old", "metrics_json": "{}"}])
    assert scan_choice(store, "run-old") == scan_choice(store, "run-old", target_id="5+9") == ("scan-b-old", BY_COMPARISON)
    # a target without a comparison row of its own: the newest finished scan covering it
    assert scan_choice(store, "run-old", target_id="5") == ("scan-b-only5", BY_COVERAGE)
    assert scan_for(store, "run-new") == "scan-b"                                    # another run: unaffected


def test_callers_share_the_rule(store):
    """compare's and explain's modules hold no lookups of their own any more; the report's pages use scan_choice."""
    import reverie.stages.compare as compare
    import reverie.stages.explain.stage as explain_stage
    from reverie.reports.data import load_target

    assert not hasattr(compare, "scan_for_run") and not hasattr(compare, "latest_run_with_dreams")
    assert not hasattr(explain_stage, "find_scan")
    td = load_target(store, "run-old", "5+9")
    assert td.scan is not None and (td.scan.scan_id, td.scan.chosen_by) == ("scan-b", BY_COVERAGE)
