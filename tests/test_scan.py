"""The scan stage on the real demo model, SAE and corpus: brute-force parity, kill/resume, reuse, offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reverie.pipeline.config import load_config
from reverie.pipeline.corpus import iter_documents
from reverie.pipeline.errors import OfflineError
from reverie.pipeline.store import Store
from reverie.sae_targets.activations import latent_activations
from reverie.sae_targets.contexts import hook_activations, iter_contexts
from reverie.sae_targets.selection import Target
from reverie.stages.scan import run_scan, scan_key, scan_pass
from reverie.stages.scan.stage import _shown

REPO = Path(__file__).resolve().parents[1]
LATENTS = [5, 9, 100]  # 9 is dense (~12% of tokens): many candidates and repeated windows


def _small(cfg, **kw):
    base = {"scan.max_tokens": 6000, "scan.batch_size": 4, "scan.top_k": 12, "scan.window_search_top": 12, "scan.window_ce_samples": 64,
            "scan.baseline_prompts": 64, "scan.random_prompt_examples": 4, "scan.checkpoint_every": 2,
            "targets.combinations": []}
    base.update(kw)
    data = cfg.to_toml_dict()
    for k, v in base.items():
        sec, key = k.split(".")
        data[sec][key] = v
    return type(cfg).model_validate(data)


def test_topk_equals_brute_force_on_demo_corpus(demo_cfg, subject, shared, tmp_path):
    # a slice of the demo corpus in which some stories occur twice: identical windows must collapse
    lines = (shared / "corpora" / "tinystories-train.jsonl").read_text().splitlines()[:14]
    (tmp_path / "slice.jsonl").write_text("\n".join(lines[:10] + lines[2:6] + lines[10:]) + "\n")
    cfg = _small(demo_cfg, **{"scan.max_tokens": 4000})
    cfg.scan.corpus.path = str(tmp_path / "slice.jsonl")
    state = scan_pass(cfg, subject, LATENTS, progress=False)

    # brute force: every context alone (no batching, no padding), all activations, one global ranking
    contexts = []
    seen = 0
    for c in iter_contexts(subject, iter_documents(cfg.scan.corpus), subject.context_size):
        contexts.append(c)
        seen += len(c.ids) - 1
        if seen >= cfg.scan.max_tokens:
            break
    assert state.n_contexts == len(contexts) and state.tokens_seen == seen
    cands = {j: [] for j in range(len(LATENTS))}
    n_firing = np.zeros(len(LATENTS), dtype=int)
    for ci, c in enumerate(contexts):
        x = hook_activations(subject, torch.tensor([c.ids]))
        la = latent_activations(subject.sae, x, LATENTS)
        pre, post = la.pre[0, 1:].numpy(), la.post[0, 1:].numpy()  # BOS excluded
        n_firing += (post > 0).sum(axis=0)
        for j in range(len(LATENTS)):
            pos = int(pre[:, j].argmax()) + 1
            s, e = _shown(len(c.ids), pos, cfg.scan.example_window, 1)
            cands[j].append((float(pre[pos - 1, j]), ci, pos, (tuple(c.ids[s:e]), pos - s)))
    n_dups = 0
    for j in range(len(LATENTS)):
        best = {}
        for v, ci, pos, key in sorted(cands[j], key=lambda t: (-t[0], t[1], t[2])):
            best.setdefault(key, (v, ci, pos))
        n_dups += len(cands[j]) - len(best)
        expect = sorted(best.values(), key=lambda t: (-t[0], t[1], t[2]))[: cfg.scan.top_k]
        got = state.topk.result(j)
        assert [(c.context_idx, c.pos) for c in got] == [(ci, pos) for _, ci, pos in expect]
        np.testing.assert_allclose([c.value for c in got], [v for v, _, _ in expect], rtol=1e-5, atol=1e-5)
        assert len({c.context_idx for c in got}) == len(got)  # no two examples from one context
        assert len({(tuple(c.payload["token_ids"]), c.payload["max_pos"]) for c in got}) == len(got)
        for c in got:  # payload: shown tokens around the max, window of dream length ending at it
            assert c.payload["token_ids"][c.payload["max_pos"]] == contexts[c.context_idx].ids[c.pos]
            full = c.pos - 11 >= 1  # a window is exactly the dream's 12 tokens, or none (never a shorter one)
            assert c.payload["window_ids"] == (contexts[c.context_idx].ids[c.pos - 11 : c.pos + 1] if full else [])
            assert list(c.payload["context_ids"]) == contexts[c.context_idx].ids
    assert n_dups >= 3, "the repeated stories give identical windows, so dedup is exercised"
    assert np.abs(state.n_firing - n_firing).max() <= 1  # density: post-activation > 0


def _rows(store: Store, sid: str) -> dict[str, list[dict]]:
    q = {
        "scans": "SELECT tokens_seen, n_contexts, ce_mean, ce_std, in_dist_threshold, n_ce_windows, latents FROM scans WHERE scan_id = ?",
        "scan_latents": "SELECT * EXCLUDE (scan_id) FROM scan_latents WHERE scan_id = ? ORDER BY latent",
        "scan_examples": "SELECT * EXCLUDE (scan_id) FROM scan_examples WHERE scan_id = ? ORDER BY latent, kind, rank",
        "baselines": "SELECT * EXCLUDE (scan_id) FROM baselines WHERE scan_id = ? ORDER BY objective_key",
    }
    return {t: store.fetch(sql, [sid]) for t, sql in q.items()}


def test_killed_scan_resumes_to_the_rows_of_an_uninterrupted_scan(demo_cfg, subject, tmp_path):
    sets = {"scan.max_tokens": 30000, "scan.batch_size": 4, "scan.top_k": 8, "scan.window_ce_samples": 64,
            "scan.baseline_prompts": 64, "scan.random_prompt_examples": 4, "scan.checkpoint_every": 2,
            "targets.combinations": []}
    killed_dir, fresh_dir = tmp_path / "killed", tmp_path / "fresh"
    cmd = [sys.executable, "-m", "reverie.pipeline.cli", "scan", "--config", str(REPO / "configs" / "demo.toml"),
           "--project-dir", str(killed_dir), "--latent", "5", "--latent", "9"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "checkpoint scan-" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert any("checkpoint scan-" in l for l in seen), "".join(seen)[-2000:]

    cfg_k = load_config(REPO / "configs" / "demo.toml", {"project.dir": str(killed_dir), **sets})
    targets = [Target([5]), Target([9])]
    sid = scan_key(cfg_k, subject, targets)
    with Store(killed_dir) as store:
        row = store.fetch_one("SELECT status, tokens_seen FROM scans WHERE scan_id = ?", [sid])
        assert row["status"] == "running" and 0 < row["tokens_seen"] < 30000  # killed midway, after a checkpoint
        assert store.fetch_one("SELECT count(*) AS n FROM scan_checkpoints WHERE scan_id = ?", [sid])["n"] == 1
        assert run_scan(cfg_k, subject, store, targets, progress=False) == sid  # resumes
        assert store.fetch("SELECT * FROM scan_checkpoints") == []
        resumed = _rows(store, sid)

        # reuse: same key → returned at once; a new combination only adds its baseline and dataset windows
        t0 = time.perf_counter()
        combo = Target([5, 9], combine="lp")
        assert run_scan(cfg_k, subject, store, targets + [combo], progress=False) == sid
        assert time.perf_counter() - t0 < 10
        keys = {r["objective_key"] for r in store.fetch("SELECT objective_key FROM baselines WHERE scan_id = ?", [sid])}
        assert keys == {"pre:last:5", "pre:last:9", "lp(p=0.1,offset=1.0):pre:last:5+9"}
        combo_rows = store.fetch("SELECT window_act FROM scan_objective_examples WHERE scan_id = ? ORDER BY rank", [sid])
        assert 8 <= len(combo_rows) <= 16 and combo_rows[0]["window_act"] >= combo_rows[-1]["window_act"]

    cfg_f = load_config(REPO / "configs" / "demo.toml", {"project.dir": str(fresh_dir), **sets})
    with Store(fresh_dir) as store:
        assert run_scan(cfg_f, subject, store, targets, progress=False) == sid
        fresh = _rows(store, sid)
    assert resumed == fresh
    assert len(fresh["scan_examples"]) > 30 and fresh["scans"][0]["ce_mean"] > 0
    kinds = {r["kind"] for r in fresh["scan_examples"]}
    assert kinds == {"top", "quantile", "random", "random_prompt", "hard_negative"}

    # the key follows what changes rows, not batching
    assert scan_key(_small(cfg_f, **{"scan.batch_size": 9}), subject, targets) == scan_key(_small(cfg_f), subject, targets)
    assert scan_key(_small(cfg_f, **{"scan.max_tokens": 7000}), subject, targets) != scan_key(_small(cfg_f), subject, targets)


def test_hub_corpus_offline_fails_fast(demo_cfg, subject):
    data = demo_cfg.to_toml_dict()
    data["scan"]["corpus"] = {**data["scan"]["corpus"], "hf_dataset": "monology/pile-uncopyrighted", "path": None}
    cfg = type(demo_cfg).model_validate(data)
    t0 = time.perf_counter()
    with Store(cfg.project.path) as store, pytest.raises(OfflineError, match="scan.corpus.path"):
        run_scan(cfg, subject, store, [Target([5])], progress=False)
    assert time.perf_counter() - t0 < 30


# ----------------------------------------------------------------------------- matched windows, searched (issue 17 §2, §4)


def test_context_windows_and_search_match_windows_fed_alone(subject, heldout_texts, one_torch_thread):
    from reverie.stages.pareto import pareto_mask
    from reverie.stages.scan.search import context_windows, evaluate_matched, search_contexts
    from reverie.stages.scan.rows import single_objective
    from reverie.pipeline.config import load_config

    w, end = context_windows([1, 10, 11, 12, 13, 14], 3, 1)
    assert w.tolist() == [[10, 11, 12], [11, 12, 13], [12, 13, 14]] and end.tolist() == [3, 4, 5]
    assert context_windows([1, 10, 11], 3, 1)[0].shape == (0, 3)  # too short: no window, never a shorter one

    cfg = load_config(REPO / "configs" / "demo.toml")
    obj = single_objective(subject, cfg, 9)
    ids = subject.with_bos(subject.encode(heldout_texts[0])[:40])
    ws, n_short = search_contexts(subject, [ids, ids[:8], ids], [obj], 12, 1)
    m = len(ids) - 1 - 12 + 1
    assert n_short == 1 and len(ws) == m  # the short context is skipped and counted; the repeated one adds nothing
    assert ws.windows.shape[1] == 12 and (ws.source == 0).all() and ws.end_pos.tolist() == list(range(12, len(ids)))
    # each window fed alone, one at a time: the same CE (both ways) and activation as the batched search
    for k in (0, m // 2, m - 1):
        ce, rest, vals = evaluate_matched(subject, [ids[1 + k : 13 + k]], [obj])
        assert ce[0] == pytest.approx(ws.ce[k], abs=1e-4) and rest[0] == pytest.approx(ws.ce_rest[k], abs=1e-4)
        assert vals[obj.key][0] == pytest.approx(ws.values[obj.key][k], abs=1e-4)
    # CE without the first token is the mean of the last 11 of the 12 per-token terms
    assert np.all(np.abs(ws.ce * 12 - ws.ce_rest * 11) < 30)
    f = pareto_mask(ws.values[obj.key], ws.ce)
    act, ce = ws.values[obj.key], ws.ce
    for i in np.flatnonzero(f):  # nothing dominates a frontier window
        assert not np.any((act > act[i]) & (ce <= ce[i]))


def test_scan_windows_always_have_the_dream_length(demo_cfg, subject, shared, tmp_path, one_torch_thread):
    """Every stored window compared with a dream has exactly dream.n_tokens tokens; short contexts are skipped and counted."""
    import json

    lines = (shared / "corpora" / "tinystories-train.jsonl").read_text().splitlines()[:12]
    short = [json.dumps({"text": t}) for t in ("The dog ran.", "Tom was sad.", "Sue saw a big red ball and she")]
    (tmp_path / "c.jsonl").write_text("\n".join(short + lines[:6] + short + lines[6:]) + "\n")
    # top_k above the number of contexts: every context is a top context, the short ones included
    cfg = _small(demo_cfg, **{"scan.max_tokens": 3000, "scan.top_k": 64, "dream.n_tokens": 10, "scan.window_search_top": 64})
    cfg.scan.corpus.path = str(tmp_path / "c.jsonl")
    combo = Target([5, 9], combine="lp")
    with Store(cfg.project.path) as store:
        sid = run_scan(cfg, subject, store, [Target([5]), Target([9]), combo], progress=False)
        tops = store.fetch("SELECT latent, window_ids, window_ce, window_ce_rest, window_act, max_pos, start FROM scan_examples "
                           "WHERE scan_id = ? AND kind = 'top'", [sid])
        assert tops and {len(r["window_ids"]) for r in tops} <= {0, 10}
        assert any(len(r["window_ids"]) == 0 for r in tops), "the short stories supply top contexts too short for a window"
        for r in tops:
            assert (r["window_ce"] is None) == (len(r["window_ids"]) == 0) and (r["window_ce_rest"] is None) == (r["window_ce"] is None)
        wins = store.fetch("SELECT objective_key, window_ids, window_ce, window_ce_rest, window_act, frontier_all, frontier_rest, latent_acts "
                           "FROM scan_windows WHERE scan_id = ?", [sid])
        assert wins and all(len(w["window_ids"]) == 10 for w in wins)
        assert {w["objective_key"] for w in wins} == {"pre:last:5", "pre:last:9", "lp(p=0.1,offset=1.0):pre:last:5+9"}
        assert all(len(w["latent_acts"]) == 2 for w in wins if "+" in w["objective_key"])
        assert all(len(r["window_ids"]) == 10 for r in store.fetch("SELECT window_ids FROM scan_objective_examples WHERE scan_id = ?", [sid]))
        lat = {r["latent"]: r for r in store.fetch("SELECT * FROM scan_latents WHERE scan_id = ?", [sid])}
        for L in (5, 9):
            assert lat[L]["n_short_contexts"] >= 3 and lat[L]["n_contexts_searched"] == len([r for r in tops if r["latent"] == L])
            best = max(w["window_act"] for w in wins if w["objective_key"] == f"pre:last:{L}")
            assert lat[L]["window_max"] == pytest.approx(best)
            # the searched best is at least the best window ending at a max token
            assert best >= max(r["window_act"] for r in tops if r["latent"] == L and r["window_act"] is not None) - 1e-9
        s = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [sid])
        assert s["window_len"] == 10 and s["ce_p10"] < s["ce_p50"] < s["in_dist_threshold"]
        assert s["ce_rest_p10"] < s["ce_rest_p50"] < s["ce_rest_in_dist_threshold"]


def test_percentile_ce_bands_from_a_synthetic_corpus(demo_cfg, subject, tmp_path, one_torch_thread):
    """CE bands come from the corpus: a corpus of 1 fluent story in 5 (low CE) and gibberish (high CE) puts the 10th
    percentile among the fluent windows and the median among the gibberish ones."""
    import json

    from reverie.stages.scan.search import ce_bands

    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, np.nan])
    b = ce_bands(x)
    assert b["n"] == 10 and b["p10"] == pytest.approx(1.9) and b["p50"] == pytest.approx(5.5) and b["mean"] == pytest.approx(5.5)
    assert b["in_dist"] == pytest.approx(5.5 + 2 * np.std(x[:10], ddof=1))
    assert ce_bands(np.array([]))["p10"] is None

    rng = np.random.default_rng(0)
    words = [subject.tokenizer.decode([int(i)]) for i in rng.integers(300, 2000, 4000)]
    story = "Once upon a time, there was a little girl named Lily. She loved to play with her dog in the park every day."
    docs = [story if d % 5 == 0 else "".join(words[40 * d : 40 * d + 40]) for d in range(60)]
    (tmp_path / "synth.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    cfg = _small(demo_cfg, **{"scan.max_tokens": 100000, "scan.window_ce_samples": 1000, "scan.top_k": 4, "scan.window_search_top": 2})
    cfg.scan.corpus.path = str(tmp_path / "synth.jsonl")
    with Store(cfg.project.path) as store:
        sid = run_scan(cfg, subject, store, [Target([5])], progress=False)
        s = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [sid])
    from reverie.stages.scan.search import evaluate_matched

    fluent, _, _ = evaluate_matched(subject, [subject.encode(story)[:12]], [])
    assert s["ce_p10"] < 6.0 and fluent[0] < 6.0 < s["ce_p50"]  # 10th percentile: a fluent window; median: gibberish
    assert s["ce_p50"] > s["ce_mean"] - s["ce_std"] and s["ce_rest_p10"] < s["ce_p10"]
