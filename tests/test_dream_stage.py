"""Dream stage: dream_target (+ attribution), merge_results, idempotent write_dream, CLI."""

from __future__ import annotations

import pytest
import torch

from reverie.pipeline.store import Store
from reverie.sae_targets.selection import Target
from reverie.stages.dream import dream_target, format_frontier, merge_results, write_dream


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def small_cfg(demo_cfg):
    d = demo_cfg.dream
    d.population, d.children, d.topk, d.iterations, d.restart_every, d.history_every = 4, 8, 64, 6, 3, 2
    d.attribution_prompts, d.attribution_topk = 1, 8
    return demo_cfg


def test_dream_target_merge_and_idempotent_write(small_cfg, subject):
    target = Target(latents=[958])
    results = [dream_target(small_cfg, subject, target, seed) for seed in (0, 1)]
    r0 = results[0]
    assert r0.frontier and r0.seed == 0 and r0.target_id == "958"
    (key, attrs), = r0.attributions.items()
    assert key == tuple(r0.frontier[0].token_ids) and len(attrs) == 12
    for a in attrs:
        assert len(a.replacements) == 8 and a.drop_worst >= a.drop_best
        assert a.replacements[0].activation >= a.replacements[-1].activation
        assert a.token_id not in {x.token_id for x in a.replacements}
    import pickle

    assert pickle.loads(pickle.dumps(r0)).frontier == r0.frontier     # a Ray worker can return it
    merged = merge_results(results)
    assert merged.seed is None and merged.seeds == [0, 1]
    assert {tuple(p.token_ids) for p in merged.frontier} <= {tuple(p.token_ids) for r in results for p in r.frontier}
    assert merged.best.activation == max(r.best.activation for r in results)
    assert "958" in format_frontier(merged)

    with Store(small_cfg.project.path) as store:
        ids = [write_dream(store, "run-1", target, r) for r in results]
        counts = {t: store.fetch_one(f"SELECT count(*) AS n FROM {t}")["n"] for t in ("dream_runs", "dream_prompts", "dream_history", "dream_attributions")}
        assert ids == ["run-1/958/seed0", "run-1/958/seed1"]
        for r in results:   # rerun: same rows, no duplicates
            write_dream(store, "run-1", target, r)
        again = {t: store.fetch_one(f"SELECT count(*) AS n FROM {t}")["n"] for t in counts}
        assert again == counts
        assert counts["dream_runs"] == 2 and counts["dream_prompts"] == sum(len(r.frontier) for r in results)
        assert counts["dream_attributions"] == 2 * 12
        row = store.fetch_one("SELECT * FROM dream_prompts WHERE dream_id = ? AND idx = 0", [ids[0]])
        assert row["token_ids"] == r0.frontier[0].token_ids and row["activation"] == pytest.approx(r0.frontier[0].activation)
        with pytest.raises(Exception):
            write_dream(store, "run-1", target, merged)


def test_cli_dream(small_cfg, tmp_path):
    from typer.testing import CliRunner

    from reverie.pipeline.cli import app
    from tests.conftest import DEMO_CONFIG

    res = CliRunner().invoke(app, ["dream", "--config", str(DEMO_CONFIG), "--latent", "958", "--latent", "1547", "--combine", "lp", "--p", "0.1",
                                   "--iterations", "3", "--set", f"project.dir=\"{tmp_path / 'p'}\"", "--set", "dream.children=4",
                                   "--set", "dream.population=2", "--set", "dream.attribution_prompts=0"])
    assert res.exit_code == 0, res.output
    assert "958+1547" in res.output and "activation" in res.output
    with Store(tmp_path / "p") as store:
        assert store.fetch_one("SELECT kind FROM runs")["kind"] == "dream"
        assert store.fetch_one("SELECT count(*) AS n FROM dream_runs")["n"] == 1
