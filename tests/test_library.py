"""The library calls reverie.scan / reverie.compare (issue 13 §2) on the demo model and SAE in memory:
the same rows as the store-backed stages the CLI and the nightly run (one code path), and the
result objects' plain-data views."""

from __future__ import annotations

import json
import math

import pytest

import reverie
from reverie.pipeline.config import ScanConfig, load_config
from reverie.pipeline.errors import LoadError
from reverie.pipeline.store import Store
from reverie.sae_targets.selection import Target
from reverie.stages.compare import run_compare
from reverie.stages.dream import dream_targets, write_dream
from reverie.stages.scan import run_scan, text_documents
from tests.conftest import DEMO_CONFIG

RUN = "run-lib"
SETS = {"scan.max_tokens": 6000, "scan.batch_size": 8, "scan.top_k": 8, "scan.window_search_top": 8, "scan.window_ce_samples": 64,
        "scan.baseline_prompts": 64, "scan.random_prompt_examples": 2, "scan.quantile_samples": 2, "scan.random_samples": 4,
        "scan.hard_negative_samples": 4, "dream.n_tokens": 6, "dream.iterations": 8, "dream.population": 8, "dream.seeds": [0]}


def _strip(rows, *drop):
    return [{k: v for k, v in r.items() if k not in ("scan_id", *drop)} for r in rows]


def _close(a, b):
    """Equal plain data, floats within 1e-9 relative (a DuckDB round trip keeps doubles; this only forgives -0.0 / NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_library_scan_and_compare_give_the_rows_of_the_store_stages(subject, heldout_texts, tmp_path, one_torch_thread):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_texts))
    cfg = load_config(DEMO_CONFIG, {"project.dir": str(tmp_path / "project"), "scan.corpus.path": str(corpus), **SETS})
    targets = [Target([35]), Target([1039]), Target([35, 1039], combine="lp")]

    mem = reverie.scan(subject.model, subject.sae, [35, 1039], heldout_texts, cfg.scan, n_tokens=cfg.dream.n_tokens, combine="lp",
                       progress=False)
    per_target = dream_targets(cfg, subject, targets)
    with Store(cfg.project.dir) as store:
        sid = run_scan(cfg, subject, store, targets, progress=False)
        assert mem.scan_id != sid and mem.scan_id.startswith("scan-")      # another corpus identity: texts in memory
        for table, rows in (("scan_latents", mem.latent_rows), ("scan_examples", mem.example_rows), ("baselines", mem.baseline_rows),
                            ("scan_windows", mem.window_rows), ("scan_objective_examples", mem.objective_rows)):
            stored = store.fetch(f"SELECT * FROM {table} WHERE scan_id = ?", [sid])
            cols = set(rows[0]) if rows else set()
            stored = [{k: r[k] for k in cols} for r in stored]
            key = lambda r: json.dumps([r.get(k) for k in ("latent", "kind", "objective_key", "rank")], default=str)  # noqa: E731
            assert len(stored) == len(rows) > 0, table
            assert _close(_strip(sorted(stored, key=key)), _strip(sorted(rows, key=key))), table
        scan_row = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [sid])
        for k, v in mem.scan_row.items():
            if k not in ("wall_s", "pass_wall_s", "updated_at"):
                assert _close(scan_row[k], v), k

        store.start_run(RUN, "dream", "{}", "h")
        store.insert("targets", [{"run_id": RUN, "target_id": t.target_id, "model_key": subject.model_key, "sae_key": subject.sae_key,
                                  "hook_name": subject.hook_name, "latents": t.latents, "combine": t.combine,
                                  "log10_density": [None] * len(t.latents), "density_source": "none"} for t in targets])
        for t, rs in zip(targets, per_target):
            for r in rs:
                write_dream(store, RUN, t, r)
        stored = {r["target_id"]: r for r in run_compare(cfg, store, RUN, sid)}

    comparison = reverie.compare([r for rs in per_target for r in rs], mem)
    assert [r["target_id"] for r in comparison.rows] == ["35", "1039", "35+1039"]
    for r in comparison.rows:
        s = stored[r["target_id"]]
        assert _close(json.loads(s["metrics_json"]), json.loads(r["metrics_json"])), r["target_id"]
        assert _close({k: s[k] for k in r if k != "metrics_json"}, {k: v for k, v in r.items() if k != "metrics_json"}), r["target_id"]
        assert r["verdict"] is not None and r["data_best_act"] is not None

    # the plain-data views
    assert mem.latents == [35, 1039]
    top = mem.examples(1039)
    assert len(top) == 8 and top[0]["max_act"] >= top[-1]["max_act"] and mem.top_texts(1039, 2)[0] == "".join(top[0]["tokens"])
    with pytest.raises(KeyError, match="latent 7 is not in this scan"):
        mem.examples(7)
    df = mem.to_pandas()
    assert list(df["latent"]) == [35, 1039] and (df["density"] > 0).all()
    assert len(mem.to_pandas("windows")) == len(mem.window_rows)
    json.dumps(mem.to_dict())                                   # JSON-able
    cdf = comparison.to_pandas()
    assert list(cdf["target_id"]) == ["35", "1039", "35+1039"] and "metrics_json" not in cdf
    d = comparison.to_dict()
    assert d["summary"]["n_single"] == 2 and d["rows"][0]["metrics"]["n_data_windows"] > 0
    json.dumps(d, default=str)
    assert comparison.metrics("1039")["objective_key"] == "pre:last:1039"
    assert "dominates" in comparison.table().splitlines()[0]


def test_compare_refuses_a_dream_of_another_objective(subject):
    from reverie.stages.compare.inputs import unscaled_key
    from reverie.stages.dream.result import DreamResult
    from reverie.stages.scan.rows import ScanResult

    assert unscaled_key("lp(p=0.1,offset=1.0,scale=z):pre:last:5+9") == "lp(p=0.1,offset=1.0):pre:last:5+9"
    assert unscaled_key("sum,scale=z:post:max:1+2") == "sum:post:max:1+2"
    scan = ScanResult("scan-x", {"window_len": 4}, [{"latent": 5, "max_act": 1.0, "window_max": 1.0}], [], [], [],
                      settings={"rank_quantity": "pre", "objective": {"reduce": "last", "p": 0.1, "offset": 1.0}})
    dream = DreamResult(target_id="5", latents=[5], combine=None, objective_key="post:last:5", objective="x", seed=0, seeds=[0],
                        config={}, frontier=[])
    with pytest.raises(ValueError, match=r"objective 'post:last:5' is not the scan's 'pre:last:5'"):
        reverie.compare(dream, scan)
    dream.objective_key = "pre:last:5"
    row = reverie.compare(dream, scan).row("5")                  # no dreams, no windows: undecided, never TRUE
    assert row["dominates"] is None and row["verdict"] == "no matched-length dataset windows"


def test_text_documents_clean_count_and_refuse_like_corpus_files():
    from reverie.pipeline.corpus import CorpusStats

    docs = text_documents(["a\x00b", {"text": "row"}, "", None, "last"])
    stats = CorpusStats()
    assert list(docs(0, stats)) == ["ab", "row", "last"]
    assert stats.counts["documents"] == 3 and stats.counts["no_text"] == 2 and stats.counts["cleaned_chars"] == 1
    assert list(docs(4, CorpusStats())) == ["last"]              # resume from document 4
    with pytest.raises(LoadError, match="document 1 has no text"):
        list(text_documents(["ok", ""], on_bad="fail")(0, CorpusStats()))
    with pytest.raises(TypeError, match="pass a list of texts"):
        text_documents("one string")


def test_a_datasets_dataset_is_a_corpus_named_by_its_fingerprint():
    datasets = pytest.importorskip("datasets")
    from reverie.pipeline.corpus import CorpusStats
    from reverie.stages.scan.memory import texts_identity

    ds = datasets.Dataset.from_dict({"story": ["one", "two", "three"], "n": [1, 2, 3]})
    assert list(text_documents(ds, "story")(1, CorpusStats())) == ["two", "three"]
    ident = texts_identity(ds, "story")
    assert ident["in_memory"] == "dataset" and ident["fingerprint"] == ds._fingerprint
    a, b = texts_identity(["x", "y"]), texts_identity(["x", "y"])
    assert a == b and a != texts_identity(["xy"]) and a["n"] == 2          # lists: a content hash
    assert texts_identity(iter(["x"]))["id"] != texts_identity(iter(["x"]))["id"]   # a one-shot iterable: never reused


def test_scan_refuses_one_string_before_any_work(subject):
    with pytest.raises(TypeError, match="pass a list of texts"):
        reverie.scan(subject.model, subject.sae, 5, "Once upon a time", ScanConfig(max_tokens=100), progress=False)
