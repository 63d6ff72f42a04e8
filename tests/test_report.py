"""Report stage: a synthetic but realistic database (every table of the migrations, some stages
missing for some targets, hostile text in dreams, examples and explanations) rendered to HTML.

``build_synthetic_db`` is also used by ``tests/test_browser.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store

RUN = "nightly-20250101"
OLD_RUN = "targets-20241231"
SCAN = "scan-abc123"
MODEL = "/shared/models/tinystories-656k"
SAE = "/shared/saes/tinystories-656k-res/jumprelu-2048"
HOOK = "blocks.1.hook_resid_pre"
NP_ID = "tinystories-656k/1-res-jr"
#: hostile strings; PAYLOAD would set window.__pwned and open a dialog if it ever ran
PAYLOAD = "<script>window.__pwned=1;alert(1)</script>"
HOSTILE = [PAYLOAD, "</td>", '"onload=', "<img src=x onerror=\"window.__pwned=1\">", "\x00", "\x1b[31m", "\u202e", "a\nb"]
WORDS = [" the", " little", " girl", " dog", " ran", " to", " park", ".", " She", " was", " happy", " and", " played", " with",
         " ball", " Tim", " saw", " big", " tree", " sun", " said", ",", " mom", " cat", " jumped", " in", " water", "!"]
T0 = dt.datetime(2025, 1, 1, 2, 0, 0)


def _tokens(rng: np.random.Generator, n: int) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), n)]


def _frontier(rng: np.random.Generator, dream_id: str, n: int, top: float, hostile: bool, n_latents: int = 1) -> list[dict]:
    """A Pareto frontier: activation rising with CE, 12 tokens each."""
    ces = np.sort(rng.uniform(2.5, 11.0, n))
    acts = top * (0.35 + 0.65 * (ces - ces[0]) / (ces[-1] - ces[0])) ** 0.6
    rows = []
    for k, (ce, act) in enumerate(zip(ces[::-1], acts[::-1])):
        toks = _tokens(rng, 12)
        if hostile and k < len(HOSTILE):
            toks[3 + k % 8] = HOSTILE[k]
        tacts = list(rng.normal(0.0, act / 6, 12))
        tacts[-1] = float(act)
        rows.append({
            "dream_id": dream_id, "idx": k, "token_ids": list(range(100, 112)), "tokens": toks, "text": "".join(toks),
            "activation": float(act), "ce": float(ce), "perplexity": float(math.exp(ce)), "lam": float(rng.uniform(0.1, 10)),
            "iteration": int(rng.integers(0, 300)), "token_acts": [float(x) for x in tacts],
            "latent_acts": [float(act * rng.uniform(0.5, 1.2)) for _ in range(n_latents)] if n_latents > 1 else None,
        })
    return rows


def _history(rng: np.random.Generator, dream_id: str, top: float) -> list[dict]:
    rows = []
    for it in (0, 25, 50, 100, 200, 299):
        scale = top * (0.3 + 0.7 * (1 - math.exp(-it / 80)))
        for ce in np.sort(rng.uniform(3.0, 11.0, 5)):
            rows.append({"dream_id": dream_id, "iteration": it, "activation": float(scale * (ce / 11.0) ** 0.5), "ce": float(ce)})
    return rows


def _attributions(rng: np.random.Generator, prompt: dict) -> list[dict]:
    rows = []
    for pos, tok in enumerate(prompt["tokens"]):
        worst = float(prompt["activation"] * rng.uniform(0.1, 1.0))
        reps = [{"token": w if j else HOSTILE[pos % len(HOSTILE)], "token_id": 300 + j, "activation": float(prompt["activation"] * rng.uniform(0.2, 1.1))}
                for j, w in enumerate(_tokens(rng, 5))]
        rows.append({"dream_id": prompt["dream_id"], "idx": prompt["idx"], "position": pos, "token_id": prompt["token_ids"][pos], "token": tok,
                     "drop_worst": worst, "drop_best": float(worst * rng.uniform(-0.2, 0.9)), "replacements_json": json.dumps(reps)})
    return rows


def _examples(rng: np.random.Generator, latent: int, top: float, hostile: bool) -> list[dict]:
    rows = []
    for kind, n in (("top", 12), ("quantile", 10), ("random", 3)):
        for rank in range(n):
            toks = _tokens(rng, 24)
            if hostile and kind == "top" and rank < len(HOSTILE):
                toks[5] = HOSTILE[rank]
            mx = top * (1 - 0.04 * rank) if kind == "top" else (top * (10 - rank) / 11 if kind == "quantile" else 0.0)
            acts = [float(max(0.0, x)) for x in rng.normal(0, mx / 5 + 1e-3, 24)]
            pos = int(rng.integers(8, 20))
            acts[pos] = float(mx)
            rows.append({
                "scan_id": SCAN, "latent": latent, "kind": kind, "rank": rank, "bin": 9 - rank if kind == "quantile" else None,
                "context_idx": int(rng.integers(0, 5000)), "start": 0, "token_ids": list(range(200, 224)), "tokens": toks, "acts": acts, "post_acts": acts,
                "max_act": float(mx), "max_pos": pos, "window_ids": list(range(12)),
                "window_ce": float(rng.uniform(3.5, 8.0)) if kind == "top" else None,
                "window_act": float(mx * rng.uniform(0.5, 0.95)) if kind == "top" else None,
            })
    return rows


def _target(run_id: str, latents: list[int], densities: list[float], combine: str | None = None) -> dict:
    return {"run_id": run_id, "target_id": "+".join(map(str, latents)), "model_key": MODEL, "sae_key": SAE, "hook_name": HOOK,
            "latents": latents, "combine": combine, "log10_density": densities, "density_source": "sparsity.safetensors"}


def _unit(target_id: str, stage: str, status: str, error: str | None = None) -> dict:
    return {"run_id": RUN, "target_id": target_id, "stage": stage, "status": status, "started_at": T0, "ended_at": T0,
            "wall_s": 12.5, "error": error}


def build_synthetic_db(project_dir: Path, seed: int = 0) -> Store:
    """A project database with two runs; the nightly run has targets
    '101' (everything, hostile text), '202' (dreams + scan, no comparison, explain failure),
    '303' (dream failed, no scan covers it) and '101+202' (lp combination, compared, not explained)."""
    from reverie.pipeline.config import ReverieConfig

    rng = np.random.default_rng(seed)
    store = Store(project_dir)
    store.fetch("SELECT 1")  # finish the migration's pending result (Store.insert right after opening trips DuckDB 2.0)
    cfg = json.dumps(ReverieConfig().to_toml_dict(), sort_keys=True)
    store.insert("runs", [
        {"run_id": OLD_RUN, "kind": "targets", "config_json": cfg, "config_hash": "0" * 16, "code_version": "0.1.0+aaaa",
         "started_at": T0 - dt.timedelta(days=1), "ended_at": T0 - dt.timedelta(days=1), "status": "done", "wall_s": 3.0, "summary_json": "{}"},
        {"run_id": RUN, "kind": "nightly", "config_json": cfg, "config_hash": "f" * 16, "code_version": "0.1.0+bbbb-dirty",
         "started_at": T0, "ended_at": T0 + dt.timedelta(minutes=42), "status": "done", "wall_s": 2520.0,
         "summary_json": json.dumps({"neuronpedia_id": NP_ID, "n_targets": 4})},
    ])
    store.insert("targets", [_target(OLD_RUN, [7], [-2.0]), _target(RUN, [101], [-2.31]), _target(RUN, [202], [-1.52]),
                             _target(RUN, [303], [-3.4]), _target(RUN, [101, 202], [-2.31, -1.52], "lp")])
    store.insert("units", [_unit("101", "dream", "done"), _unit("202", "dream", "done"), _unit("101+202", "dream", "done"),
                           _unit("303", "dream", "failed", "RuntimeError: <b>out of memory</b>"), _unit("*", "scan", "done"),
                           _unit("101", "compare", "done"), _unit("101+202", "compare", "done"), _unit("101", "explain", "done"),
                           _unit("202", "explain", "failed", "rate limited")])
    dreams, prompts, history, attrs = [], [], [], []
    for tid, seeds, top, n_lat in (("101", [0, 1], 9.0, 1), ("202", [0], 4.0, 1), ("101+202", [0], 6.0, 2)):
        for s in seeds:
            did = f"{RUN}/{tid}/seed{s}"
            dreams.append({"dream_id": did, "run_id": RUN, "target_id": tid, "seed": s, "objective": f"pre:last:{tid}",
                           "config_json": json.dumps({"iterations": 300, "population": 8}), "n_iterations": 300,
                           "n_candidates": 76800, "wall_s": 95.0 + s, "created_at": T0,
                           "objective_key": f"pre:last:{tid}", "stop_reason": "iterations"})
            fr = _frontier(rng, did, 9, top * (1 - 0.1 * s), hostile=(tid == "101" and s == 0), n_latents=n_lat)
            prompts += fr
            history += _history(rng, did, top)
            if tid == "101" and s == 0:
                attrs += _attributions(rng, fr[0]) + _attributions(rng, fr[1])
    store.insert("dream_runs", dreams)
    store.insert("dream_prompts", prompts)
    store.insert("dream_history", history)
    store.insert("dream_attributions", attrs)
    scan = {"scan_id": SCAN, "model_key": MODEL, "sae_key": SAE, "hook_name": HOOK,
            "corpus_json": json.dumps({"path": "/shared/corpora/tinystories-train.jsonl"}), "settings_json": "{}",
            "latents": [101, 202], "status": "done", "tokens_seen": 200000, "n_contexts": 1563, "window_len": 12,
            "ce_mean": 5.77, "ce_std": 1.14, "n_ce_windows": 1024, "in_dist_threshold": 8.05, "wall_s": 60.0, "pass_wall_s": 50.0,
            "created_at": T0, "updated_at": T0, "ce_p10": 4.31, "ce_p50": 5.74, "ce_rest_mean": 4.9, "ce_rest_std": 1.1,
            "ce_rest_p10": 3.52, "ce_rest_p50": 4.88, "ce_rest_in_dist_threshold": 7.1}
    store.insert("scans", [scan, {**scan, "scan_id": "scan-running", "status": "running", "latents": [101, 202, 303],
                                  "updated_at": T0 + dt.timedelta(hours=1)}])
    lat_rows, examples = [], []
    for lat, top in ((101, 6.5), (202, 4.4)):
        edges = list(np.linspace(0, top, 31))
        counts = [int(c) for c in 4000 * np.exp(-np.linspace(0, 8, 30))]
        counts[-1] = 1  # the bin holding the maximum has one token: it must stay visible on the log scale
        lat_rows.append({"scan_id": SCAN, "latent": lat, "n_tokens": 200000, "n_firing": 980, "density": 0.0049, "max_act": top,
                         "mean_act": top / 5, "hist_edges": edges, "hist_counts": counts, "window_max": top * 0.86,
                         "n_windows_searched": 7400, "n_contexts_searched": 64, "n_short_contexts": 1})
        examples += _examples(rng, lat, top, hostile=lat == 101)
    store.insert("scan_latents", lat_rows)
    store.insert("scan_examples", examples)
    store.insert("scan_objective_examples", [
        {"scan_id": SCAN, "objective_key": "lp(p=0.1,offset=1.0):pre:last:101+202", "rank": k, "latent": 101 + 101 * (k % 2), "source_rank": k // 2,
         "window_ids": list(range(12)), "window_ce": float(rng.uniform(3.5, 8.0)), "window_act": float(6.6 - 0.3 * k)} for k in range(10)])
    store.insert("baselines", [{"scan_id": SCAN, "objective_key": "pre:last:101", "n": 1024, "length": 12, "mean": -0.4, "std": 0.9, "max": 2.7}])
    store.insert("scan_windows", [
        {"scan_id": SCAN, "objective_key": key, "rank": k, "latent": 101, "source_rank": k, "context_idx": 10 + k, "end_pos": 20 + k,
         "window_ids": list(range(12)), "tokens": _tokens(rng, 11) + ([HOSTILE[0]] if k == 0 else [" dog"]), "window_ce": 2.0 + k,
         "window_ce_rest": 1.5 + k, "window_act": 1.0 + k, "latent_acts": [1.0 + k, 0.5 * k] if "+" in key else None,
         "frontier_all": True, "frontier_rest": True}
        for key in ("pre:last:101", "lp(p=0.1,offset=1.0):pre:last:101+202") for k in range(5)])
    comp = {"run_id": RUN, "target_id": "101", "scan_id": SCAN, "dream_max": 9.0, "data_max": 5.6, "ratio": 9.0 / 5.6,
            "dream_best_ce_limit": 4.1, "data_best_ce_limit": 3.9, "dream_best_in_dist": 7.2, "data_best_in_dist": 5.6,
            "dream_z": 10.4, "data_z": 6.7, "n_beating": 5, "attribution_overlap": 0.67, "beats_data": True,
            "beats_data_in_dist": True, "ce_convention": "all", "data_best_act": 5.6, "data_best_ce": 6.6, "dream_at_data_ce": 7.3,
            "dream_at_data_ce_ce": 6.4, "dominates": True, "frontier_dominated": 0.6, "n_data_frontier": 5,
            "verdict": "a dream dominates the dataset's best window", "in_dist_state": "dream beats the dataset in distribution",
            "data_max_in_context": 6.5, "is_combination": False,
            "metrics_json": json.dumps({"note": PAYLOAD, "ce_limit": 4.31, "bands": [
                {"band": "p10", "limit": 4.31, "perplexity": 74.4, "dream_best": 4.1, "data_best": 3.9},
                {"band": "p50", "limit": 5.74, "perplexity": 311.0, "dream_best": 6.0, "data_best": 4.8},
                {"band": "in_dist", "limit": 8.05, "perplexity": 3134.0, "dream_best": 7.2, "data_best": 5.6}]})}
    store.insert("comparisons", [comp, {**comp, "target_id": "101+202", "dream_max": 6.0, "data_max": 6.6, "ratio": None,
                                        "n_beating": 0, "beats_data": False, "beats_data_in_dist": None, "dominates": False,
                                        "verdict": "no dream is as fluent as the dataset's best window", "dream_at_data_ce": None,
                                        "in_dist_state": "no dream in distribution", "is_combination": True, "data_max_in_context": None,
                                        "metrics_json": json.dumps({"members": [
                                            {"latent": 101, "dream_best": 6.2, "dream_best_ce": 9.1, "data_max_alone": 5.59, "data_max_in_context": 6.5, "ratio": 1.109},
                                            {"latent": 202, "dream_best": 2.9, "dream_best_ce": 9.5, "data_max_alone": 3.78, "data_max_in_context": 4.4, "ratio": 0.767}]})}])
    store.insert("compare_summary", [{"run_id": RUN, "n_targets": 2, "frac_beats": 1.0, "frac_beats_in_dist": 1.0,
                                      "ce_mean": 5.77, "ce_std": 1.14, "in_dist_threshold": 8.05, "ce_convention": "all", "n_single": 1,
                                      "n_dominance_known": 1, "n_dominates": 1, "frac_dominates": 1.0, "ce_p10": 4.31, "ce_p50": 5.74}])
    store.insert("explanations", [
        {"explanation_id": f"{RUN}/101/{src}", "run_id": RUN, "target_id": "101", "source": src, "model": "gpt-4o-mini",
         "text": txt, "raw_text": txt, "prompt_hash": "h", "n_dataset": 10, "n_dreams": 10, "prompt_tokens": 900, "completion_tokens": 40, "created_at": T0}
        for src, txt in (("both", f"Fires on a dog running to the park. {PAYLOAD} </td> \"onload= \x1b\u202e end"),
                         ("dataset", "Animals moving towards places."))
    ])
    store.insert("explain_scores", [
        {"run_id": RUN, "target_id": "101", "explanation_id": f"{RUN}/101/both", "scored_explanation_id": f"{RUN}/{'202' if b else '101'}/both",
         "holdout_set": hs, "baseline": b, "metric": "balanced_accuracy", "value": v, "n": 20, "n_pos": 10, "n_neg": 10,
         "ci_low": v - 0.11, "ci_high": min(1.0, v + 0.09), "ci_method": "bootstrap", "n_pos_wanted": 50, "n_neg_wanted": 10, "n_hard_neg": 5}
        for hs, b, v in (("dataset", False, 0.85), ("dataset", True, 0.52), ("dreams", False, 0.7), ("dreams", True, 0.5))
    ])
    store.insert("explain_failures", [
        {"run_id": RUN, "target_id": "202", "what": "explain:dreams", "why": "HTTP 429 <rate limited>", "created_at": T0},
        {"run_id": RUN, "target_id": "*", "what": "budget", "why": "token budget reached after 3 targets", "created_at": T0}])
    store.insert("llm_calls", [{"run_id": RUN, "target_id": "101", "purpose": "explain:both", "key": "k", "model": "gpt-4o-mini",
                                "cached": False, "attempts": 1, "prompt_tokens": 900, "completion_tokens": 40, "cost_usd": 0.0002,
                                "latency_s": 1.2, "created_at": T0}])
    if "logit_lens" in store.tables():  # issue 12: the decoder direction's logit lens and neighbours
        store.insert("logit_lens", [
            {"sae_key": SAE, "model_key": MODEL, "latent": lat, "sae_sha": "", "norm_scale": "through the final norm's scale (ln_final.w of RMS)",
             "d_vocab": 2048, "top_ids": list(range(10)), "top_tokens": [HOSTILE[0]] + [f" top{lat}_{i}" for i in range(1, 10)],
             "top_logits": [2.5 - 0.1 * i for i in range(10)], "bottom_ids": list(range(10, 20)),
             "bottom_tokens": [f" bot{lat}_{i}" for i in range(10)], "bottom_logits": [-2.0 + 0.1 * i for i in range(10)],
             "hist_edges": list(np.linspace(-2.0, 2.5, 41)), "hist_counts": [int(c) for c in 200 * np.exp(-np.linspace(-3, 3, 40) ** 2)],
             "mean": 0.01, "std": 0.7, "created_at": T0} for lat in (101, 202)])
        store.insert("latent_neighbours", [
            {"source_id": SAE, "latent": 101, "kind": "decoder_cosine", "rank": r, "neighbour": n, "value": v,
             "n_both": None, "n_latent": None, "n_neighbour": None} for r, (n, v) in enumerate(((202, 0.61), (777, 0.4)))] + [
            {"source_id": SCAN, "latent": 101, "kind": "cooccurrence", "rank": 0, "neighbour": 888, "value": 0.37,
             "n_both": 37, "n_latent": 80, "n_neighbour": 57}])
        store.execute("UPDATE scans SET cooc_window = 16, n_cooc_windows = 12500 WHERE scan_id = ?", [SCAN])
    return store


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The synthetic project rendered once per module: (index path, store, cfg)."""
    from reverie.pipeline.config import load_config
    from reverie.reports.render import render_reports

    cfg = load_config(None, {"project.dir": str(tmp_path_factory.mktemp("report") / "project")})
    store = build_synthetic_db(cfg.project.path)
    index = render_reports(cfg, store, RUN)
    yield index, store, cfg
    store.close()


class _Tags(HTMLParser):
    """Collects start tags with their attributes, and text inside <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def _parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


# ---------------------------------------------------------------------------- tests
def test_render_writes_every_page_and_plot(report):
    index, _, _ = report
    out = index.parent
    assert index.name == "index.html" and index.is_file()
    pages = {p.name for p in out.glob("*.html")}
    assert pages == {"index.html", "latent-101.html", "latent-202.html", "latent-303.html", "latent-101_202.html"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    # 101: all three plots; 202: no comparison but dreams+scan → three; 303: none; combination: three; index: two
    assert pngs == sorted([f"latent-{t}-{k}.png" for t in ("101", "202", "101_202") for k in ("actce", "evolution", "hist")]
                          + ["index-beats.png", "index-ratio.png"])
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for page in pages:
        tags = _parse((out / page).read_text())
        for tag, attrs in tags.tags:
            if tag == "img":
                assert (out / attrs["src"]).is_file(), f"{page}: missing image {attrs['src']}"
            if tag in ("link", "script", "img") and (attrs.get("src") or attrs.get("href")):
                assert "://" not in (attrs.get("src") or attrs.get("href")), f"{page}: external resource {attrs}"
    assert (out / "report.css").is_file()


def test_index_lists_targets_with_metrics_and_metadata(report):
    index, _, _ = report
    html = index.read_text()
    rows = re.findall(r"<tr>\s*<td data-sort=\"[^\"]*\"><a href=\"(latent-[^\"]+)\">", html)
    assert rows == ["latent-101.html", "latent-202.html", "latent-303.html", "latent-101_202.html"]
    assert "2025-01-01 02:00:00 UTC" in html and "42 min 00 s" in html and "0.1.0+bbbb-dirty" in html
    assert 'class="sortable targets"' in html
    assert "1.61" in html  # ratio 9.0 / 5.6
    # the dominance headline, over single latents only (the combination is left out of the counts)
    assert "a dream dominates the dataset's best window for 1 / 1" in html and "1 combination target(s)" in html
    assert "median 5.74" in html and "10th percentile 4.31" in html  # corpus CE bands on the index
    assert "dataset wins" in html and "dominates" in html  # badges: combination 101+202 loses, 101 dominates
    assert "1.11×" in html and "0.767×" in html  # the combination: each member against its own dataset max
    assert "Fires on a dog running" in html
    assert "token budget reached after 3 targets" in html  # run-level explain failure
    assert "effective configuration" in html and "&#34;ce_limit&#34;: &#34;p10&#34;" in html


def test_latent_page_sections(report):
    index, _, _ = report
    html = (index.parent / "latent-101.html").read_text()
    for needle in (MODEL, SAE, HOOK, "log10 density -2.31", f"https://www.neuronpedia.org/{NP_ID}/101",
                   "dream max / dataset max (window alone)", "1.61", "z-score vs random prompts", "10.4", "best at CE ≤ corpus 10th percentile",
                   "dataset max (in context)", "best dream at CE ≤ 6.6", "7.3", "perplexity 735", "dreams dominate 60% of the dataset",
                   "corpus median window CE", "The dataset's frontier", "7,400 full-length windows",
                   "pre:last:101", "Token attribution", 'class="attr-tok"', "quantile samples", "latent-101-actce.png",
                   "latent-101-evolution.png", "latent-101-hist.png", "Animals moving towards places.", "0.85", "0.52"):
        assert needle in html, needle
    # 18 frontier prompts from 2 seeds, the two top prompts of seed 0 have attribution views
    assert html.count('class="attr-row"') == 2
    assert "18 frontier prompts from 2 seed(s)" in html
    # the max token of every top example is marked
    assert html.count('class="tok max"') >= 12 + 18


def test_feature_panel_logit_lens_and_neighbours(report):
    """Issue 12: the logit-lens table (escaped tokens), its histogram, decoder-cosine and co-occurrence
    neighbours with their values and a link where the neighbour has a page."""
    index, _, _ = report
    html = (index.parent / "latent-101.html").read_text()
    for needle in ("Decoder direction", "W_dec[101] @ W_U", "ln_final.w of RMS", " top101_1", " bot101_0", "2.5", "-2",
                   "Histogram of the 2,048 logits", 'class="hbar"', "decoder-cosine neighbour", "0.61", '<a href="latent-202.html">latent 202</a>',
                   "latent 777", "co-occurrence neighbour", "0.37", "37 / 80 / 57", "16-token corpus windows"):
        assert needle in html, needle
    assert "&lt;script&gt;window.__pwned=1;alert(1)&lt;/script&gt;" in html
    combo = (index.parent / "latent-101_202.html").read_text()
    assert "Member latent 101" in combo and "Member latent 202" in combo and " top202_1" in combo
    p303 = (index.parent / "latent-303.html").read_text()
    assert "No logit lens stored for latent 303" in p303
    # scores show their 95% interval, the n used and that it is fewer than wanted
    for needle in ("[0.74, 0.94]", "20 (10 + 10, 5 hard negatives)", "fewer than the 50 + 10 wanted", "detection"):
        assert needle in html, needle


def test_missing_pieces_say_so(report):
    index, _, _ = report
    out = index.parent
    p202 = (out / "latent-202.html").read_text()
    assert "Not compared: the compare stage has not run for this target." in p202
    assert "The explain stage failed for this target" in p202 and "rate limited" in p202
    assert "HTTP 429 &lt;rate limited&gt;" in p202
    assert "latest covering scan" in p202  # no comparison: the latest done scan covering 202, not the running one
    p303 = (out / "latent-303.html").read_text()
    assert "The dream stage failed for this target" in p303 and "&lt;b&gt;out of memory&lt;/b&gt;" in p303
    assert "No dataset examples: no finished scan covers this target." in p303
    assert "No explanations: the explain stage has not run for this target." in p303
    assert "No activation-vs-CE plot" in p303 and "No frontier-evolution plot" in p303
    combo = (out / "latent-101_202.html").read_text()
    assert "Latents 101 + 202" in combo and ">lp<" in combo
    assert "<h3>Latent 101</h3>" in combo and "<h3>Latent 202</h3>" in combo
    assert "each latent: own activation" in combo and "No explanations" in combo
    assert "Each member latent against its own dataset max" in combo and "0.767" in combo and "no dream is as fluent" in combo
    assert "dreams beat the dataset in distribution" not in combo


def test_hostile_text_renders_as_text(report):
    """<script>, </td>, "onload= and control characters from dreams, dataset examples,
    attribution replacements, explanations and comparison metrics appear only escaped."""
    index, _, _ = report
    out = index.parent
    for name in ("index.html", "latent-101.html"):
        html = (out / name).read_text()
        tags = _parse(html)
        scripts = [t for t, _ in tags.tags if t == "script"]
        assert len(scripts) == 1, f"{name}: only the sort script may exist"
        assert all("__pwned" not in s and "alert" not in s for s in tags.scripts)
        assert not [a for t, attrs in tags.tags for a in attrs if a.startswith("on")], f"{name}: event-handler attribute"
        assert not [t for t, _ in tags.tags if t == "img" and _["src"] == "x"]
        for raw in ("\x00", "\x1b", "\u202e"):
            assert raw not in html, f"{name}: raw control character {raw!r}"
    html = (out / "latent-101.html").read_text()
    assert "&lt;script&gt;window.__pwned=1;alert(1)&lt;/script&gt;" in html  # dream token / example token / explanation
    assert "&lt;/td&gt;" in html and "&#34;onload=" in html
    assert "\\x1b[31m" in html and "\\x00" in html and "\\u202e" in html  # visible escapes
    # every table row still has its own cells: the injected </td> did not close one
    for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S):
        assert row.count("<td") == row.count("</td>")
    idx = index.read_text()
    assert "&lt;script&gt;window.__pwned=1;alert(1)&lt;/script&gt;" in idx  # index's explanation excerpt


def test_csp_allows_only_the_sort_script(report):
    import base64
    import hashlib

    index, _, _ = report
    html = index.read_text()
    tags = _parse(html)
    csp = next(a["content"] for t, a in tags.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    body = tags.scripts[0]
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in csp and "default-src 'none'" in csp


def test_partial_database_renders(tmp_path):
    """Only targets recorded (no dream/scan/compare/explain rows), in a database lacking the
    later stages' tables, still renders with a line per missing section."""
    from reverie.pipeline.config import load_config
    from reverie.reports.render import render_reports

    cfg = load_config(None, {"project.dir": str(tmp_path / "p")})
    with Store(cfg.project.path) as store:
        store.fetch("SELECT 1")
        store.insert("runs", [{"run_id": "r1", "kind": "targets", "config_json": "{}", "config_hash": "x", "code_version": "0",
                               "started_at": T0, "ended_at": None, "status": "running", "wall_s": None, "summary_json": None}])
        store.insert("targets", [_target("r1", [5], [-2.0])])
        for table in ("explain_scores", "explanations", "explain_failures", "comparisons", "compare_summary", "scan_examples"):
            store.execute(f"DROP TABLE {table}")
    with Store(cfg.project.path, read_only=True) as store:
        index = render_reports(cfg, store, None, tmp_path / "out")
    assert index == tmp_path / "out" / "index.html"
    html = index.read_text()
    assert "the compare stage has not run yet" in html and "latent-5.html" in html
    page = (tmp_path / "out" / "latent-5.html").read_text()
    for line in ("No dreams: the dream stage has not run", "No dataset examples", "No explanations", "Not compared"):
        assert line in page
    assert not list((tmp_path / "out").glob("*.png"))


def test_unknown_run_and_empty_database(tmp_path):
    from reverie.pipeline.config import load_config
    from reverie.reports.render import render_reports

    cfg = load_config(None, {"project.dir": str(tmp_path / "p")})
    with Store(cfg.project.path) as store:
        with pytest.raises(ReverieError, match="no runs"):
            render_reports(cfg, store, None)
    with build_synthetic_db(tmp_path / "q") as store:
        with pytest.raises(ReverieError, match=r"run 'nope' not found.*nightly-20250101"):
            render_reports(cfg, store, "nope")


def test_default_out_dir_and_latest_run(tmp_path):
    from reverie.pipeline.config import load_config
    from reverie.reports.render import default_out_dir, render_reports

    cfg = load_config(None, {"project.dir": str(tmp_path / "p")})
    assert default_out_dir(cfg, RUN) == cfg.project.path / "reports" / RUN
    with build_synthetic_db(cfg.project.path) as store:
        index = render_reports(cfg, store, None)  # latest run = the nightly
    assert index == cfg.project.path / "reports" / RUN / "index.html"
    cfg2 = load_config(None, {"project.dir": str(tmp_path / "p"), "report.out": str(tmp_path / "elsewhere")})
    assert default_out_dir(cfg2, RUN) == tmp_path / "elsewhere"


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from reverie.pipeline.cli import app

    project = tmp_path / "p"
    build_synthetic_db(project).close()
    res = CliRunner().invoke(app, ["report", "--set", f"project.dir={project}", "--run", OLD_RUN, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "o" / "index.html") in res.output
    assert (tmp_path / "o" / "latent-7.html").is_file()
    res = CliRunner().invoke(app, ["report", "--set", f"project.dir={project}", "--run", "missing"])
    assert res.exit_code == 2 and "not found" in res.output


def test_clean_text_and_formatting():
    from markupsafe import Markup

    from reverie.reports.render import clean_text, fmt_num, fmt_seconds, page_name, show_token

    assert clean_text("a\x00b\x1bc\u202ed\u2066e\nf\tg\x7f") == "a\\x00b\\x1bc\\u202ed\\u2066e\nf\tg\\x7f"
    assert clean_text(Markup("<b>\x00</b>")) == Markup("<b>\x00</b>") and clean_text(3.5) == 3.5
    assert show_token("\n") == "↵" and show_token("") == "∅" and show_token(" a") == " a"
    assert fmt_num(None) == "—" and fmt_num(float("nan")) == "—" and fmt_num(1.23456) == "1.23" and fmt_num(12345) == "12,345"
    assert fmt_seconds(2520) == "42 min 00 s" and fmt_seconds(5.25) == "5.2 s"
    assert page_name("12+345") == "latent-12_345.html"
