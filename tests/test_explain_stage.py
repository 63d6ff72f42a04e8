"""Explain stage against a real OpenAI-compatible HTTP server on loopback (tests/fake_openai.py):
retries, cache, budget cap, failure isolation, key hygiene, and the CLI end to end."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from fake_openai import FakeOpenAI
from typer.testing import CliRunner

from reverie.pipeline.config import load_config
from reverie.pipeline.store import Store, now
from reverie.stages.explain import run_explain
from reverie.stages.explain.client import REDACTED, LLMClient, LLMError, StoreCache

KEY = "sk-test-9f8e7d6c5b4a-SECRET"
RUN = "run-explain-test"
SCAN = "scan-explain-test"
MODEL_KEY, SAE_KEY, HOOK = "tinystories-656k", "/shared/saes/jumprelu-2048", "blocks.1.hook_resid_pre"
# target id -> the word its latent(s) fire on ('zebra' is the one the server can be told to fail)
TRIGGERS = {"101": [" cat"], "202": [" ball"], "303": [" tree"], "404": [" zebra"], "101+202": [" cat", " ball"]}
FILLER = (" the little girl named Lily went to the park with her mom and saw a big red house near the river on a sunny day "
          "she was happy and they played together until it was time to go home for dinner").split(" ")[1:]


@pytest.fixture()
def server():
    with FakeOpenAI(model="fake-model", slow_s=1.0) as s:
        yield s


def make_cfg(tmp_path, server, **extra):
    overrides = {
        "project.dir": str(tmp_path / "project"), "explain.base_url": server.base_url, "explain.model": "fake-model",
        "explain.max_retries": 3, "explain.backoff_base_s": 0.01, "explain.backoff_max_s": 0.05, "explain.timeout_s": 0.4,
        "explain.n_examples": 8, "explain.n_holdout": 6, "explain.detection_batch": 6, "explain.max_concurrency": 4,
    }
    overrides.update(extra)
    return load_config(None, overrides)


def sentence(rng: random.Random, words: list[str], n: int = 10) -> tuple[list[str], int]:
    """A TinyStories-like token list with the trigger words at a random position; returns (tokens, position of the last)."""
    tokens = ["Once"] + [" " + rng.choice(FILLER) for _ in range(n)]
    pos = rng.randrange(2, n)
    tokens[pos:pos] = words
    return tokens, pos + len(words) - 1


def populate(store: Store, run_id: str = RUN, scan_id: str = SCAN, triggers: dict[str, list[str]] = TRIGGERS) -> None:
    """Synthetic rows for a run: targets, a scan with top/quantile/random/random_prompt examples per latent, dreams."""
    rng = random.Random(0)
    store.start_run(run_id, "test", "{}", "0")
    store.insert("targets", [
        {"run_id": run_id, "target_id": t, "model_key": MODEL_KEY, "sae_key": SAE_KEY, "hook_name": HOOK,
         "latents": [int(x) for x in t.split("+")], "combine": "lp" if "+" in t else None,
         "log10_density": [-2.5] * len(t.split("+")), "density_source": "corpus scan"} for t in triggers
    ])
    singles = {t: w for t, w in triggers.items() if "+" not in t}
    store.insert("scans", [{
        "scan_id": scan_id, "model_key": MODEL_KEY, "sae_key": SAE_KEY, "hook_name": HOOK, "corpus_json": "{}", "settings_json": "{}",
        "latents": [int(t) for t in singles], "status": "done", "tokens_seen": 20000, "n_contexts": 100, "window_len": 12,
        "ce_mean": 3.0, "ce_std": 0.5, "in_dist_threshold": 4.0, "wall_s": 1.0, "created_at": now(), "updated_at": now(),
    }])
    examples, latents = [], []
    for t, words in singles.items():
        lat = int(t)

        def add(kind, rank, bin_, tokens, acts):
            examples.append({
                "scan_id": scan_id, "latent": lat, "kind": kind, "rank": rank, "bin": bin_, "context_idx": rank, "start": 0,
                "token_ids": list(range(len(tokens))), "tokens": tokens, "acts": acts, "post_acts": [max(a, 0.0) for a in acts],
                "max_act": max(acts),
                "max_pos": acts.index(max(acts)), "window_ids": None, "window_ce": None, "window_act": None,
            })

        for rank in range(10):
            tokens, pos = sentence(rng, words)
            add("top", rank, None, tokens, [0.0] * pos + [6.0 - 0.2 * rank] + [0.0] * (len(tokens) - pos - 1))
        for b in range(10):
            for r in range(2):
                tokens, pos = sentence(rng, words)
                add("quantile", 10 * b + r, b, tokens, [0.0] * pos + [0.3 + 0.5 * b] + [0.0] * (len(tokens) - pos - 1))
        for rank in range(8):
            tokens, _ = sentence(rng, [])
            add("random", rank, None, tokens, [0.0] * len(tokens))
            rp = [" " + rng.choice(FILLER) for _ in range(6)]
            add("random_prompt", rank, None, rp, [-0.5] * 6)
        latents.append({"scan_id": scan_id, "latent": lat, "n_tokens": 20000, "n_firing": 60, "density": 0.003, "max_act": 6.0,
                        "mean_act": 2.0, "hist_edges": None, "hist_counts": None})
    store.insert("scan_examples", examples)
    store.insert("scan_latents", latents)
    runs, prompts = [], []
    for t, words in triggers.items():
        dream_id = f"{run_id}/{t}/seed0"
        runs.append({"dream_id": dream_id, "run_id": run_id, "target_id": t, "seed": 0, "objective": f"pre:last:{t}", "config_json": "{}",
                     "n_iterations": 30, "n_candidates": 7680, "wall_s": 2.0, "created_at": now()})
        for idx in range(14):
            tokens, pos = sentence(rng, words, n=5)
            act = 9.0 - 0.5 * idx if idx < 12 else -0.5          # the two most fluent frontier prompts do not fire
            token_acts = [0.1] * len(tokens)
            for k in range(len(words)):                          # a combination's dream marks each of its words
                token_acts[pos - k] = act
            prompts.append({"dream_id": dream_id, "idx": idx, "token_ids": list(range(len(tokens))), "tokens": tokens, "text": "".join(tokens),
                            "activation": act, "ce": 2.0 + 0.3 * idx, "perplexity": 7.0, "lam": 1.0, "iteration": idx,
                            "token_acts": token_acts, "latent_acts": None})
    store.insert("dream_runs", runs)
    store.insert("dream_prompts", prompts)


@pytest.fixture()
def project(tmp_path, server, monkeypatch):
    """(cfg, store) with synthetic data and the API key in the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = make_cfg(tmp_path, server)
    store = Store(cfg.project.path)
    populate(store)
    yield cfg, store
    store.close()


def client_for(cfg, store) -> LLMClient:
    return LLMClient(cfg.explain, KEY, StoreCache(store), base_url=cfg.explain.base_url)


def complete(client: LLMClient, content: str):
    async def go():
        try:
            return await client.complete([{"role": "user", "content": content}], "test", "t")
        finally:
            await client.aclose()

    return asyncio.run(go())


# ---------------------------------------------------------------------------- client
@pytest.mark.parametrize("fault", ["rate_limit", "server_error", "slow", "malformed", "empty_choices"])
def test_retries_succeed_after_faults(tmp_path, server, fault):
    cfg = make_cfg(tmp_path, server)
    server.inject(fault, fault)
    with Store(cfg.project.path) as store:
        client = client_for(cfg, store)
        c = complete(client, f"hello {fault}")
    assert c.text == "I am a fake model." and not c.cached
    assert [r.fault for r in server.completions] == [fault, fault, None]
    assert client.calls[0].attempts == 3 and client.calls[0].prompt_tokens > 0


def test_retry_after_header_is_honoured(tmp_path, server):
    cfg = make_cfg(tmp_path, server)
    server.retry_after = "1"
    server.inject("rate_limit")
    with Store(cfg.project.path) as store:
        t0 = time.perf_counter()
        complete(client_for(cfg, store), "hello")
        waited = time.perf_counter() - t0
    assert waited >= 0.95          # the backoff alone would wait at most backoff_max_s = 0.05 s
    assert len(server.completions) == 2


def test_permanent_failure_is_redacted_llm_error(tmp_path, server):
    cfg = make_cfg(tmp_path, server, **{"explain.max_retries": 2})
    server.fail_when("hello", "echo_key")
    with Store(cfg.project.path) as store:
        with pytest.raises(LLMError) as info:
            complete(client_for(cfg, store), "hello")
        assert store.fetch("SELECT * FROM llm_cache") == []
    msg = str(info.value)
    assert KEY not in msg and REDACTED in msg and "3 attempt" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(server.completions) == 3 and all(r.authorization == f"Bearer {KEY}" for r in server.completions)


def test_cache_prevents_a_second_request(tmp_path, server):
    cfg = make_cfg(tmp_path, server)
    with Store(cfg.project.path) as store:
        first = complete(client_for(cfg, store), "same prompt")
        client = client_for(cfg, store)
        second = complete(client, "same prompt")
        rows = store.fetch("SELECT key, response_text FROM llm_cache")
    assert len(server.completions) == 1
    assert second.cached and second.text == first.text and second.key == first.key
    assert client.calls[0].cached and client.calls[0].cost_usd == 0.0 and client.calls[0].attempts == 0
    assert rows == [{"key": first.key, "response_text": first.text}]


# ---------------------------------------------------------------------------- stage
def test_stage_explains_and_scores_every_target_and_source(project, server):
    cfg, store = project
    summary = run_explain(cfg, store, RUN, SCAN)
    assert not summary.skipped and summary.stopped is None and summary.n_failures == 0, store.fetch("SELECT * FROM explain_failures")
    exps = store.fetch("SELECT target_id, source, text, n_dataset, n_dreams, prompt_hash FROM explanations WHERE run_id = ?", [RUN])
    assert {(e["target_id"], e["source"]) for e in exps} == {(t, s) for t in TRIGGERS for s in ("dataset", "dreams", "both")}
    by = {(e["target_id"], e["source"]): e for e in exps}
    assert by[("303", "dreams")]["text"] == 'fires on the words "tree".'
    assert by[("101", "both")]["n_dataset"] == 4 and by[("101", "both")]["n_dreams"] == 4
    assert by[("101", "dataset")]["n_dreams"] == 0 and by[("101", "dataset")]["n_dataset"] == 8
    # the combination target shows its first latent's dataset examples, and says so in the prompt
    assert by[("101+202", "dataset")]["text"] == 'fires on the words "cat".'
    assert any("first of 101+202" in r.body["messages"][1]["content"] for r in server.completions)

    scores = store.fetch("SELECT * FROM explain_scores WHERE run_id = ? AND metric = 'balanced_accuracy' AND scorer = 'detection'", [RUN])
    assert len(scores) == len(TRIGGERS) * 3 * 2 * 2          # targets × sources × held-out sets × (explanation, baseline)
    assert all(s["n"] == 12 and s["n_pos"] == 6 and s["n_neg"] == 6 for s in scores)
    real = [s["value"] for s in scores if not s["baseline"]]
    base = [s["value"] for s in scores if s["baseline"]]
    # the right word separates firing from non-firing text; another latent's explanation is about chance
    assert min(real) == 1.0, [(s["explanation_id"], s["holdout_set"], s["value"]) for s in scores if s["value"] < 1 and not s["baseline"]]
    assert max(base) <= 0.75 and sum(base) / len(base) < 0.6
    for s in scores:
        assert s["scored_explanation_id"] != s["explanation_id"] if s["baseline"] else s["scored_explanation_id"] == s["explanation_id"]
    assert {r["metric"] for r in store.fetch("SELECT DISTINCT metric FROM explain_scores")} == {"balanced_accuracy", "f1", "precision", "recall"}

    calls = store.fetch("SELECT count(*) AS n, sum(prompt_tokens) AS pt, bool_or(cached) AS any_cached FROM llm_calls WHERE run_id = ?", [RUN])[0]
    n_requests = len(server.completions)
    assert calls["n"] == n_requests == summary.n_requests and calls["pt"] > 0 and not calls["any_cached"]
    assert summary.cost_usd > 0 and summary.prompt_tokens == calls["pt"]

    # a rerun pays for nothing: every answer comes from the cache, results are identical
    again = run_explain(cfg, store, RUN, SCAN)
    assert len(server.completions) == n_requests and again.n_requests == 0 and again.n_cached == n_requests
    assert store.fetch("SELECT target_id, source, text, n_dataset, n_dreams, prompt_hash FROM explanations WHERE run_id = ?", [RUN]) == exps
    assert len(store.fetch("SELECT * FROM explain_scores WHERE run_id = ? AND metric = 'balanced_accuracy' AND scorer = 'detection'", [RUN])) == len(scores)


def test_fuzzing_and_detection_with_n_ci_and_hard_negatives(project, server):
    """Issue 12: detection and fuzzing rows for dataset and dream held-out sets, each with the n it used,
    the n the settings wanted, and a 95% interval around the value; hard negatives among the dataset
    negatives (contexts where a decoder neighbour fires), and batched requests."""
    cfg, store = project
    rng = random.Random(1)
    hard = []
    for rank in range(6):  # hard negatives of latent 101: its neighbour 555 fires, 101 does not
        tokens, _ = sentence(rng, [" dog"])
        hard.append({"scan_id": SCAN, "latent": 101, "kind": "hard_negative", "rank": rank, "bin": None, "context_idx": 500 + rank, "start": 0,
                     "token_ids": list(range(len(tokens))), "tokens": tokens, "acts": [-0.2] * len(tokens), "post_acts": [0.0] * len(tokens),
                     "max_act": -0.2, "max_pos": 0, "window_ids": None, "window_ce": None, "window_act": None,
                     "neighbour": 555, "neighbour_act": 1.5})
    store.insert("scan_examples", hard)
    cfg = type(cfg).model_validate({**cfg.to_toml_dict(), "explain": {**cfg.to_toml_dict()["explain"], "n_holdout": 8, "hard_negative_share": 0.5}})
    summary = run_explain(cfg, store, RUN, SCAN)
    assert summary.stopped is None and summary.n_failures == 0, store.fetch("SELECT * FROM explain_failures")
    rows = store.fetch("SELECT * FROM explain_scores WHERE run_id = ? AND target_id = '101' AND NOT baseline", [RUN])
    for scorer in ("detection", "fuzzing"):
        for hs in ("dataset", "dreams"):
            got = [r for r in rows if r["scorer"] == scorer and r["holdout_set"] == hs]
            assert {r["metric"] for r in got} == {"balanced_accuracy", "f1", "precision", "recall"}, (scorer, hs)
            for r in got:
                assert r["n"] == r["n_pos"] + r["n_neg"] > 0 and r["n_pos_wanted"] == 8 and r["n_neg_wanted"] == 8
                assert r["ci_low"] is not None and r["ci_low"] <= r["value"] + 1e-9 and r["value"] <= r["ci_high"] + 1e-9
                assert r["ci_method"] == ("wilson" if r["metric"] in ("precision", "recall") else "bootstrap")
                assert r["n_requests"] >= 1
    det = {r["holdout_set"]: r for r in rows if r["scorer"] == "detection" and r["metric"] == "balanced_accuracy"}
    # the scan holds 9 non-shown firing quantile samples per latent at most: fewer than wanted is recorded, never hidden
    assert det["dataset"]["n_pos"] <= 8 and det["dataset"]["n_neg"] == 8
    assert det["dataset"]["n_hard_neg"] == 4 and det["dreams"]["n_hard_neg"] == 0  # half the 8 negatives are hard negatives
    fz = [r for r in rows if r["scorer"] == "fuzzing" and r["metric"] == "balanced_accuracy"]
    assert all(r["value"] >= 0.75 for r in fz), fz  # right marks vs wrong marks separate with the right explanation
    # hard negatives reached the scorer: a detection prompt holds a ' dog' context of latent 101
    assert any("Example" in r.body["messages"][1]["content"] and " dog" in r.body["messages"][1]["content"]
               and "cat" in r.body["messages"][1]["content"].split("Examples:")[0] for r in server.completions)
    # fuzzing prompts mark tokens and batch several examples per request
    fuzz = [r for r in server.completions if "<<this>>" in r.body["messages"][0]["content"]]
    assert fuzz and all(r.body["messages"][1]["content"].count("\nExample ") >= 2 for r in fuzz)


def test_failing_target_is_recorded_and_others_finish(project, server):
    cfg, store = project
    server.fail_when("zebra", "server_error")
    server.inject("rate_limit", "slow", "malformed", "empty_choices")   # transient faults elsewhere are retried away
    summary = run_explain(cfg, store, RUN, SCAN)
    assert summary.stopped is None
    failures = store.fetch("SELECT target_id, what, why FROM explain_failures WHERE run_id = ?", [RUN])
    assert {f["target_id"] for f in failures} == {"404"}
    assert {f["what"] for f in failures} == {"explain:dataset", "explain:dreams", "explain:both"}
    assert all("InternalServerError" in f["why"] and "4 attempt" in f["why"] for f in failures)
    exps = store.fetch("SELECT target_id, source FROM explanations WHERE run_id = ?", [RUN])
    assert {e["target_id"] for e in exps} == set(TRIGGERS) - {"404"} and len(exps) == 3 * (len(TRIGGERS) - 1)
    n_scores = store.fetch("SELECT count(*) AS n FROM explain_scores WHERE run_id = ? AND metric = 'f1' AND scorer = 'detection'", [RUN])[0]["n"]
    assert n_scores == (len(TRIGGERS) - 1) * 3 * 2 * 2
    # the failed target's text was never used as anyone's baseline
    assert not store.fetch("SELECT * FROM explain_scores WHERE scored_explanation_id LIKE ?", [f"{RUN}/404/%"])


def test_budget_cap_stops_the_stage_cleanly(project, server):
    cfg, store = project
    cfg.explain.budget_tokens = 1
    cfg.explain.max_concurrency = 2
    summary = run_explain(cfg, store, RUN, SCAN)
    assert summary.stopped and "budget cap reached" in summary.stopped and "budget_tokens" in summary.stopped
    assert "STOPPED" in summary.message
    assert 1 <= len(server.completions) <= 2                  # only the requests already admitted went out
    failures = store.fetch("SELECT target_id, what, why FROM explain_failures WHERE run_id = ?", [RUN])
    assert {"target_id": "*", "what": "stage", "why": f"stopped: {summary.stopped}"} in failures
    assert store.fetch("SELECT count(*) AS n FROM explain_scores")[0]["n"] == 0
    assert len(store.fetch("SELECT * FROM explanations WHERE run_id = ?", [RUN])) == summary.n_explanations <= 2
    # the cap is per run: running again does not send anything new
    run_explain(cfg, store, RUN, SCAN)
    assert len(server.completions) <= 2


def test_key_never_reaches_db_or_logs(project, server, caplog, capsys):
    cfg, store = project
    caplog.set_level(logging.DEBUG)
    server.fail_when("zebra", "echo_key")                     # error bodies that repeat the Authorization header
    server.inject("echo_key", "rate_limit")
    summary = run_explain(cfg, store, RUN, SCAN)
    assert summary.n_failures > 0 and summary.n_explanations > 0
    echoed = store.fetch("SELECT why FROM explain_failures WHERE target_id = '404'")
    assert echoed and all(REDACTED in f["why"] for f in echoed)
    cols = store.fetch("SELECT table_name, column_name FROM information_schema.columns WHERE data_type LIKE 'VARCHAR%'")
    assert len(cols) > 20
    for c in cols:
        hits = store.fetch(f'SELECT count(*) AS n FROM "{c["table_name"]}" WHERE CAST("{c["column_name"]}" AS VARCHAR) LIKE ?', [f"%{KEY}%"])
        assert hits[0]["n"] == 0, c
    store.close()
    assert KEY.encode() not in (cfg.project.path / "reverie.duckdb").read_bytes()
    assert caplog.records and KEY not in caplog.text
    out = capsys.readouterr()
    assert KEY not in out.out and KEY not in out.err


# ---------------------------------------------------------------------------- CLI
def test_cli_explain_end_to_end(tmp_path, server, monkeypatch):
    from reverie.pipeline.cli import app

    project_dir = tmp_path / "cli-project"
    with Store(project_dir) as store:
        populate(store)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runner = CliRunner()
    args = ["explain", "--project-dir", str(project_dir), "--set", "explain.model=fake-model", "--set", "explain.backoff_base_s=0.01"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.strip().count("\n") == 0 and "OPENAI_API_KEY" in res.output

    res = runner.invoke(app, args, env={"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url})
    assert res.exit_code == 0, res.output
    assert KEY not in res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"run {RUN}   scan {SCAN}")
    for t in TRIGGERS:
        for source in ("dataset", "dreams", "both"):
            row = [l for l in lines if l.split()[:2] == [t, source]]
            assert len(row) == 1 and "1.00 (" in row[0], (t, source, res.output)
    assert "0 failures" in lines[-1]
    with Store(project_dir) as store:
        assert store.fetch("SELECT count(*) AS n FROM explanations")[0]["n"] == len(TRIGGERS) * 3
        assert store.fetch("SELECT count(DISTINCT explanation_id) AS n FROM explain_scores")[0]["n"] == len(TRIGGERS) * 3
    assert any(r.path.endswith("/models") for r in server.requests)
