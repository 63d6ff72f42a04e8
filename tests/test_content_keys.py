"""One content-hash definition (pipeline.hashing.content_key / content_seed): every key it replaced
keeps its value, byte for byte, so stored scan ids, fingerprints and LLM caches stay valid."""

from __future__ import annotations

import hashlib
import json
import random
from types import SimpleNamespace

import pytest

from reverie.pipeline.config import load_config
from reverie.pipeline.hashing import content_key, content_seed, files_sha256
from reverie.stages.explain.client import cache_key

BLOBS = [
    {"b": 1, "a": [3, 2, {"z": None, "y": 1.5}], "é": "naïve ✓"},
    {"messages": [{"role": "user", "content": "héllo \u2028 😀"}], "params": {"temperature": 0.0}},
    [["x.safetensors", "ab" * 32], ["cfg.json", "cd" * 32]],
    {},
]


@pytest.mark.parametrize("blob", BLOBS)
def test_content_key_hashes_the_old_bytes(blob):
    # the recipes the callers used before the merge
    assert content_key(blob) == hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    assert content_key(blob, default=str) == hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    full = hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert content_key(blob, length=None, ensure_ascii=False) == full and len(full) == 64


def test_content_key_is_canonical_and_strict():
    assert content_key({"a": 1, "b": {"c": 2, "d": 3}}) == content_key({"b": {"d": 3, "c": 2}, "a": 1})
    assert content_key([1, 2]) != content_key([2, 1])
    assert len(content_key({"a": 1}, length=8)) == 8
    with pytest.raises(TypeError):
        content_key({"p": object()})
    assert content_key({"p": 1.0}, default=str) == content_key({"p": 1.0})  # default only touches what JSON cannot encode


def test_llm_cache_key_unchanged():
    msgs = [{"role": "system", "content": "Explain ✓"}, {"role": "user", "content": "naïve"}]
    old = hashlib.sha256(json.dumps({"model": "m", "messages": msgs, "params": {"temperature": 0.0}}, sort_keys=True,
                                    ensure_ascii=False).encode("utf-8")).hexdigest()
    assert cache_key("m", msgs, {"temperature": 0.0}) == old


def test_config_fingerprint_unchanged():
    cfg = load_config(None, {"dream.n_tokens": 7})
    data = cfg.to_toml_dict()
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    sub = {s: data[s] for s in ("dream", "scan")}
    assert cfg.fingerprint("dream", "scan") == hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def test_files_hash_unchanged(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.json").write_text("{}")
    items = [["a.bin", hashlib.sha256(b"abc").hexdigest()], ["b.json", hashlib.sha256(b"{}").hexdigest()]]
    assert files_sha256([tmp_path / "b.json", tmp_path / "a.bin"], root=tmp_path) == hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def test_scan_key_and_dream_fingerprint_unchanged():
    from reverie.pipeline.reuse import dream_fingerprint
    from reverie.sae_targets.spec import Target
    from reverie.stages.scan.stage import scan_key, scan_settings

    cfg = load_config(None)
    subject = SimpleNamespace(model_key="m", sae_key="s", hook_name="blocks.0.hook_resid_post", model_sha="1" * 16, sae_sha="2" * 16,
                              d_sae=8, prepend_bos=True, bos_id=1, context_size=32, backend="hooked")
    corpus = {"in_memory": "texts", "n": 1, "sha256": "0" * 64}
    blob = {"model": "m", "sae": "s", "hook": subject.hook_name, "model_sha": "1" * 16, "sae_sha": "2" * 16, "corpus": corpus,
            "settings": scan_settings(cfg, subject), "latents": [3, 5]}
    assert scan_key(cfg, subject, [5, 3], corpus=corpus) == "scan-" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    fp = dream_fingerprint(cfg, subject, Target([5]))
    data = cfg.to_toml_dict()
    model = {k: v for k, v in data["model"].items() if k not in ("device", "backend")}
    old = {"model": model, "sae": data["sae"], "dream": data["dream"],
           "objective": {k: data["targets"].get(k) for k in ("combine", "p", "offset", "quantity", "reduce")},
           "model_key": "m", "sae_key": "s", "hook": subject.hook_name, "model_sha": "1" * 16, "sae_sha": "2" * 16,
           "latents": [5], "combine": None}
    assert fp == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_content_seed_matches_the_explain_stage_recipe():
    parts = (0, "5+7", "dataset", "fuzz")
    old = int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")
    assert content_seed(*parts) == old and 0 <= old < 2 ** 64
    assert content_seed(0, "5") != content_seed(0, "6")
    # stable shuffles: the same parts give the same order in any process
    xs = list(range(20))
    random.Random(content_seed(*parts)).shuffle(xs)
    ys = list(range(20))
    random.Random(old).shuffle(ys)
    assert xs == ys
