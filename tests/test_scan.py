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

from pipeline.config import load_config
from pipeline.corpus import iter_documents
from pipeline.errors import OfflineError
from pipeline.store import Store
from sae_targets.activations import latent_activations
from sae_targets.contexts import hook_activations, iter_contexts
from sae_targets.selection import Target
from stages.scan import run_scan, scan_key, scan_pass
from stages.scan.stage import _shown

REPO = Path(__file__).resolve().parents[1]
LATENTS = [5, 9, 100]  # 9 is dense (~12% of tokens): many candidates and repeated windows


def _small(cfg, **kw):
    base = {"scan.max_tokens": 6000, "scan.batch_size": 4, "scan.top_k": 12, "scan.window_ce_samples": 64,
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
            assert c.payload["window_ids"] == contexts[c.context_idx].ids[max(1, c.pos - 11) : c.pos + 1]
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
    cmd = [sys.executable, "-m", "pipeline.cli", "scan", "--config", str(REPO / "configs" / "demo.toml"),
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
    assert kinds == {"top", "quantile", "random", "random_prompt"}

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
