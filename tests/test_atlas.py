"""Nights that add up (issue 15): three simulated nights on the demo (few iterations, a fake LLM
on loopback), the atlas over them, night-over-night diffs, cross-night reuse, the draw's
preference for new latents, and the atlas in real Chromium from file://.

Night 1 draws 2 random latents (seed 5) + the combination 35+85; night 2 the same seed, so the
draw must prefer 2 latents night 1 did not explain, and 35+85 is reused; night 3 allows repeats,
so it draws night 1's latents again and reuses all of night 1's dreams.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reverie.pipeline.config import load_config
from reverie.pipeline.store import Store
from tests.conftest import DEMO_CONFIG
from test_browser import browser, shots  # noqa: F401 - the Chromium fixtures (module-scoped)

NIGHTS = ["night-1", "night-2", "night-3"]
SMALL = {
    "targets.n_random": 2, "targets.seed": 5, "targets.combinations": [[35, 85]],
    "dream.iterations": 4, "dream.population": 4, "dream.children": 8, "dream.topk": 64, "dream.restart_every": 3,
    "dream.seeds": [0], "dream.attribution_prompts": 1, "dream.attribution_topk": 8,
    "scan.max_tokens": 2000, "scan.batch_size": 8, "scan.top_k": 8, "scan.checkpoint_every": 2,
    "scan.window_ce_samples": 32, "scan.baseline_prompts": 32, "run.torch_threads": 1,
    "explain.model": "fake-model", "explain.max_retries": 3, "explain.backoff_base_s": 0.01, "explain.backoff_max_s": 0.05,
    "explain.n_examples": 6, "explain.n_holdout": 4, "explain.detection_batch": 8, "explain.max_concurrency": 4,
    "explain.fuzzing": False, "explain.ci_bootstrap": 100,
}


def _cfg(project: Path, server, **extra):
    return load_config(DEMO_CONFIG, {**SMALL, "project.dir": str(project), "explain.base_url": server.base_url, **extra})


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Three nightlies in one project; returns (project dir, cfg of the last night, summaries)."""
    from fake_openai import FakeOpenAI

    from reverie.pipeline.orchestrate import run_nightly

    project = tmp_path_factory.mktemp("atlas") / "project"
    old = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    os.environ["OPENAI_API_KEY"] = "sk-test-atlas"
    os.environ.pop("OPENAI_BASE_URL", None)
    try:
        with FakeOpenAI(model="fake-model") as server:
            summaries = []
            for run_id, extra in zip(NIGHTS, [{}, {}, {"targets.allow_repeats": True}]):
                cfg = _cfg(project, server, **extra)
                summaries.append(run_nightly(cfg, run_id))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for s in summaries:
        assert s.exit_code == 0, s.failures
    return project, cfg, summaries


def _targets(project: Path) -> dict[str, set[str]]:
    with Store(project, read_only=True) as s:
        out: dict[str, set[str]] = {}
        for r in s.fetch("SELECT run_id, target_id FROM targets"):
            out.setdefault(r["run_id"], set()).add(r["target_id"])
        return out


@pytest.mark.slow
def test_draw_prefers_new_latents_and_reuse_skips_epo(nights):
    project, _, summaries = nights
    t = _targets(project)
    singles = {n: {x for x in ids if "+" not in x} for n, ids in t.items()}
    assert len(singles["night-1"]) == 2 and len(singles["night-2"]) == 2
    assert not singles["night-1"] & singles["night-2"], "night 2 drew a latent night 1 had explained"
    assert singles["night-3"] == singles["night-1"], "allow_repeats: the plain draw (same seed) again"
    with Store(project, read_only=True) as s:
        rows = {(r["run_id"], r["target_id"]): r for r in s.fetch("SELECT run_id, target_id, reused_from, fingerprint, wall_s FROM dream_runs")}
        units = {(r["run_id"], r["target_id"]): r for r in s.fetch("SELECT run_id, target_id, wall_s FROM units WHERE stage = 'dream'")}
        n_prompts = {r["dream_id"]: r["n"] for r in s.fetch("SELECT dream_id, count(*) AS n FROM dream_prompts GROUP BY 1")}
    assert rows[("night-2", "35+85")]["reused_from"] == "night-1/35+85/seed0"
    for tid in t["night-3"]:
        r = rows[("night-3", tid)]
        assert r["reused_from"] == f"night-1/{tid}/seed0" and r["fingerprint"] == rows[("night-1", tid)]["fingerprint"]
        assert units[("night-3", tid)]["wall_s"] == 0.0
        assert n_prompts[f"night-3/{tid}/seed0"] == n_prompts[f"night-1/{tid}/seed0"] > 0
    for tid in singles["night-2"]:
        assert rows[("night-2", tid)]["reused_from"] is None and rows[("night-2", tid)]["fingerprint"]


@pytest.mark.slow
def test_atlas_rows_diff_rows_and_pages(nights):
    project, cfg, summaries = nights
    t = _targets(project)
    union = set().union(*t.values())
    atlas = project / "reports" / "index.html"
    assert all(s.atlas_html == atlas for s in summaries) and atlas.exists()
    from reverie.reports.atlas import diff_runs

    with Store(project, read_only=True) as s:
        rows = s.fetch("SELECT * FROM atlas_latents")
        diffs = s.fetch("SELECT * FROM night_diffs")
        assert {r["target_id"] for r in rows} == union
        assert all(r["explanation"] and r["verdict"] for r in rows)
        assert all(r["score"] is not None and r["score_ci_low"] <= r["score"] <= r["score_ci_high"] for r in rows)
        # night 2 vs night 1: its singles are new; night 3 vs night 2: night 1's singles come back (not new)
        new2 = {d["target_id"] for d in diffs if d["run_b"] == "night-2" and d["kind"] == "new"}
        assert new2 == t["night-2"] - t["night-1"]
        back3 = {d["target_id"] for d in diffs if d["run_b"] == "night-3" and d["kind"] == "returning"}
        assert back3 == t["night-3"] - t["night-2"] and not any(d["run_b"] == "night-3" and d["kind"] == "new" for d in diffs)
        # the reused combination did not change between nights (identical rows): no 'changed' rows
        assert not [d for d in diffs if d["target_id"] == "35+85"]
        assert diff_runs(s, "night-1", "night-3") == [] or all(d["kind"] == "fingerprint" for d in diff_runs(s, "night-1", "night-3"))
    text = (project / "reports" / "atlas-index.js").read_text()
    assert text.startswith("window.REVERIE_ATLAS = {") and text.isascii() and "<" not in text
    diff2 = (project / "reports" / "diff-night-2.html").read_text()
    for tid in t["night-2"] - t["night-1"]:
        assert f">{tid}</a>" in diff2
    # a latent page of night 3 links its night-1 page (relative, and the file is there)
    lid = sorted(x for x in t["night-1"] & t["night-3"] if "+" not in x)[0]
    page = project / "reports" / "night-3" / f"latent-{lid}.html"
    assert f'href="../night-1/latent-{lid}.html"' in page.read_text()
    assert (page.parent / f"../night-1/latent-{lid}.html").resolve().exists()


def _fake_store(tmp_path):
    """A store with two nights' atlas rows for the diff rules (no model needed)."""
    import datetime as dt

    from reverie.pipeline.store import now

    store = Store(tmp_path / "p")
    base = {"model_key": "m", "sae_key": "s", "hook_name": "h", "latents": [1], "combine": None, "log10_density": [-2.0],
            "config_hash": "c", "best_dream": "a dream", "best_dream_act": 5.0, "best_dream_ce": 3.0, "top_example": "an example",
            "explanation_source": "both", "score_metric": "detection balanced_accuracy on dataset", "n_seeds": 3,
            "dreams_reused_from": None, "page": "x/latent-1.html", "updated_at": now(), "ratio": 1.0, "data_max": 5.0}
    for i, run in enumerate(("a", "b")):
        store.start_run(run, "nightly", '{"dream": {"iterations": %d}}' % (10 if run == "a" else 20), run)
        store.execute("UPDATE runs SET started_at = ? WHERE run_id = ?", [dt.datetime(2026, 1, 1 + i), run])
    return store, base


def test_diff_rules_noise_cis_and_regressions(tmp_path):
    import datetime as dt

    from reverie.reports.atlas import diff_runs

    store, base = _fake_store(tmp_path)
    a = {**base, "run_id": "a", "night": "2026-01-01", "started_at": dt.datetime(2026, 1, 1), "dream_fp": "fp1"}
    b = {**base, "run_id": "b", "night": "2026-01-02", "started_at": dt.datetime(2026, 1, 2), "dream_fp": "fp1"}
    rows = [
        # 1: within the seed spread, same verdict, overlapping CIs: nothing
        {**a, "target_id": "1", "dream_max": 5.0, "seed_max_min": 4.0, "seed_max_max": 6.0, "verdict": "v", "dominates": True,
         "explanation": "e", "score": 0.7, "score_ci_low": 0.6, "score_ci_high": 0.8},
        {**b, "target_id": "1", "dream_max": 5.8, "seed_max_min": 4.5, "seed_max_max": 5.8, "verdict": "v", "dominates": True,
         "explanation": "e", "score": 0.75, "score_ci_low": 0.65, "score_ci_high": 0.85},
        # 2: dream max up beyond the spread, CIs apart, explanation changed
        {**a, "target_id": "2", "dream_max": 5.0, "seed_max_min": 4.9, "seed_max_max": 5.0, "verdict": "v", "dominates": True,
         "explanation": "old words", "score": 0.5, "score_ci_low": 0.4, "score_ci_high": 0.6},
        {**b, "target_id": "2", "dream_max": 9.0, "seed_max_min": 8.9, "seed_max_max": 9.0, "verdict": "v", "dominates": True,
         "explanation": "new words", "score": 0.9, "score_ci_low": 0.85, "score_ci_high": 0.95},
        # 3: fingerprint changed and dominance lost: a regression
        {**a, "target_id": "3", "dream_max": 5.0, "seed_max_min": 5.0, "seed_max_max": 5.0, "verdict": "dom", "dominates": True,
         "explanation": "e", "score": None, "score_ci_low": None, "score_ci_high": None},
        {**b, "target_id": "3", "dream_fp": "fp2", "dream_max": 5.0, "seed_max_min": 5.0, "seed_max_max": 5.0, "verdict": "lost",
         "dominates": False, "explanation": "e", "score": None, "score_ci_low": None, "score_ci_high": None},
        # 4: only tonight
        {**b, "target_id": "4", "dream_max": 1.0, "seed_max_min": 1.0, "seed_max_max": 1.0, "verdict": "v", "dominates": None,
         "explanation": None, "score": None, "score_ci_low": None, "score_ci_high": None},
    ]
    store.insert("atlas_latents", rows)
    got = {(d["target_id"], d["kind"], d["field"]) for d in diff_runs(store, "a", "b")}
    assert got == {("*", "fingerprint", "dream"), ("2", "changed", "best_dream"), ("2", "changed", "score"),
                   ("2", "changed", "explanation"), ("3", "regression", "verdict"), ("4", "new", "target")}
    store.close()


def test_random_draw_prefers_unexplained_latents():
    import torch

    from reverie.sae_targets.selection import random_alive_latents

    dens = torch.full((50,), -2.0)
    dens[:5] = -9.0  # dead
    plain = random_alive_latents(dens, 6, seed=3, floor=-4, ceiling=-1)
    assert random_alive_latents(dens, 6, seed=3, floor=-4, ceiling=-1, explained=set()) == plain
    seen = set(plain)
    fresh = random_alive_latents(dens, 6, seed=3, floor=-4, ceiling=-1, explained=seen)
    assert not set(fresh) & seen and all(i >= 5 for i in fresh)
    # too few new ones: every new latent, then explained ones
    most = set(range(5, 48))
    got = random_alive_latents(dens, 4, seed=3, floor=-4, ceiling=-1, explained=most)
    assert {48, 49} <= set(got) and len(set(got)) == 4


# ----------------------------------------------------------------------------- Chromium, file://
@pytest.mark.browser
@pytest.mark.slow
def test_atlas_in_chromium_search_filters_and_night_links(nights, browser, shots):
    from test_browser import _open

    project, _, _ = nights
    t = _targets(project)
    union = set().union(*t.values())
    page, problems = _open(browser, project / "reports" / "index.html")
    assert page.evaluate("window.__pwned === undefined")
    rows = page.locator("#atlas-rows tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.cells[0].querySelector('a').textContent)")) == sorted(union)
    # a latent seen on nights 1 and 3 links both nights' pages, and the links open
    lid = sorted(x for x in t["night-1"] & t["night-3"] if "+" not in x)[0]
    row = page.locator(f"#atlas-rows tr:has(td:first-child a:text-is('{lid}'))")
    hrefs = row.locator("a.night-link").evaluate_all("as => as.map(a => a.href)")
    assert len(hrefs) == 2 and any("/night-1/" in h for h in hrefs) and any("/night-3/" in h for h in hrefs)
    # search by a word of one latent's explanation (the fake LLM quotes tokens: fires on the words "x", ...)
    with Store(project, read_only=True) as s:
        expl = {r["target_id"]: r["explanation"] for r in s.fetch("SELECT target_id, explanation FROM atlas_latents WHERE run_id = 'night-2'")}
    import re

    target, word = next((tid, w) for tid, e in sorted(expl.items()) for w in re.findall(r'"([A-Za-z]{3,})"', e or ""))
    page.fill("#atlas-q", word)
    shown = rows.evaluate_all("rs => rs.map(r => r.cells[0].querySelector('a').textContent)")
    assert target in shown, (word, shown)
    # every row shown has the word in its explanation, dreams or examples; every row hidden does not
    hay = page.evaluate("Object.fromEntries(window.REVERIE_ATLAS.entries.map(e => [e.target, [e.explanation, e.search].join(' ').toLowerCase()]))")
    assert set(shown) == {tid for tid, h in hay.items() if word.lower() in h}
    page.screenshot(path=str(shots / "atlas-search.png"), full_page=True)
    page.fill("#atlas-q", "")
    page.select_option("#atlas-sort", "density")
    dens = rows.evaluate_all("rs => rs.map(r => r.cells[6].textContent)")
    nums = [float(x) for x in dens if x != "—"]
    assert nums == sorted(nums)
    page.fill("#atlas-score", "1.01")
    assert rows.count() == 0
    page.fill("#atlas-score", "")
    page.screenshot(path=str(shots / "atlas.png"), full_page=True)
    # the night-2 diff page lists its new latents
    page.goto((project / "reports" / "diff-night-2.html").as_uri())
    new = page.locator("table.diff-new tbody tr td:first-child").all_inner_texts()
    assert set(new) == t["night-2"] - t["night-1"]
    page.screenshot(path=str(shots / "diff-night-2.png"), full_page=True)
    # a night-3 latent page links its night-1 page, which opens
    page.goto((project / "reports" / "night-3" / f"latent-{lid}.html").as_uri())
    page.locator(".other-nights a.night-link").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/night-1/latent-{lid}.html")
    assert not problems, problems
    page.close()


@pytest.mark.slow
def test_cli_diff_and_gc_keep_the_atlas(nights, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from reverie.pipeline.cli import app
    from reverie.pipeline.retention import db_size

    src, _, _ = nights
    project = tmp_path / "project"
    shutil.copytree(src, project)
    t = _targets(project)
    runner = CliRunner()
    res = runner.invoke(app, ["diff", "night-1", "night-2", "--project-dir", str(project)])
    assert res.exit_code == 0, res.output
    assert "2 new" in res.output and all(f"new         {tid:<10} target" in res.output for tid in t["night-2"] - t["night-1"])
    with Store(project, read_only=True) as s:
        atlas_before = s.fetch("SELECT run_id, target_id, explanation, verdict, score FROM atlas_latents ORDER BY ALL")
        hist_before = {r["run_id"]: r["n"] for r in s.fetch(
            "SELECT d.run_id, count(*) AS n FROM dream_history h JOIN dream_runs d USING (dream_id) GROUP BY 1")}
    size_before = db_size(project)
    res = runner.invoke(app, ["gc", "--keep-nights", "1", "--keep-prompts", "2", "--project-dir", str(project)])
    assert res.exit_code == 0, res.output
    assert "collected 2 (night-2, night-1)" in res.output and "MiB →" in res.output
    assert db_size(project) < size_before
    with Store(project, read_only=True) as s:
        assert s.fetch("SELECT run_id, target_id, explanation, verdict, score FROM atlas_latents ORDER BY ALL") == atlas_before
        hist = {r["run_id"]: r["n"] for r in s.fetch(
            "SELECT d.run_id, count(*) AS n FROM dream_history h JOIN dream_runs d USING (dream_id) GROUP BY 1")}
        assert hist == {"night-3": hist_before["night-3"]}
        assert max(r["n"] for r in s.fetch("SELECT dream_id, count(*) AS n FROM dream_prompts WHERE dream_id LIKE 'night-1/%' GROUP BY 1")) <= 2
        gc_at = {r["run_id"]: r["gc_at"] for r in s.fetch("SELECT run_id, gc_at FROM runs")}
        assert gc_at["night-3"] is None and gc_at["night-1"] and gc_at["night-2"]
        assert s.fetch("SELECT count(*) AS n FROM comparisons")[0]["n"] == sum(len(v) for v in t.values())
        from reverie.pipeline.reuse import reusable_dreams

        fps = [r["fingerprint"] for r in s.fetch("SELECT fingerprint FROM dream_runs WHERE run_id = 'night-2' AND reused_from IS NULL")]
        assert fps and all(reusable_dreams(s, "night-4", fp, [0]) == [] for fp in fps), "a collected night was offered for reuse"
    text = (project / "reports" / "atlas-index.js").read_text()
    assert all(f'"target": "{tid}"' in text for tid in set().union(*t.values()))
