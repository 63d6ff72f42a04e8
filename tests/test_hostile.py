"""Hostile inputs and faults (issue 16): nothing runs from the database, one bad byte stops
nothing, changed inputs change the cache key, NaN weights and a full disk give one clear message,
bad inputs fail with exit code 2 before the model loads. (SIGINT/SIGTERM → 'interrupted' +
130/143 + resume: tests/test_runs.py; untrusted LLM text: tests/test_explain_untrusted.py.)"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reverie.pipeline import plaindata
from reverie.pipeline.cli import app
from reverie.pipeline.config import load_config
from reverie.pipeline.corpus import CorpusStats, iter_documents
from reverie.pipeline.errors import LoadError, StoreWriteError
from reverie.pipeline.store import Store
from tests.conftest import DEMO_CONFIG, REPO

runner = CliRunner()
SAE_DIR = "{shared}/saes/tinystories-656k-res/jumprelu-2048"


# ----------------------------------------------------------------------------- 1. data, not code


class _Planted:
    """A pickle that would create a file when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_checkpoint_runs_nothing(tmp_path, caplog):
    from reverie.stages.scan.store import load_checkpoint

    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Planted(marker))
    pickle.loads(blob)  # the blob is live: loading it as a pickle would run code
    assert marker.exists()
    marker.unlink()
    with Store(tmp_path / "p") as store:
        store.insert("scan_checkpoints", [{"scan_id": "scan-x", "state": blob, "updated_at": dt_now()}])
        with caplog.at_level("WARNING"):
            assert load_checkpoint(store, "scan-x") is None
    assert not marker.exists()
    assert "not a reverie plain-data blob" in caplog.text and "starts over" in caplog.text
    with pytest.raises(plaindata.PlainDataError):  # nor when the pickle hides behind the magic prefix
        plaindata.loads(plaindata.MAGIC + blob)
    assert not marker.exists()


def test_plain_data_refuses_unknown_classes_and_object_arrays():
    from reverie.stages.scan.topk import Candidate

    blob = plaindata.dumps({"c": Candidate(1.0, 2, 3, (4, 5), {"a": np.arange(3)})}, [Candidate])
    with pytest.raises(plaindata.PlainDataError, match="unknown class 'Candidate'"):
        plaindata.loads(blob)  # the reader names the classes it accepts
    back = plaindata.loads(blob, [Candidate])["c"]
    assert back.dedup == (4, 5) and back.payload["a"].tolist() == [0, 1, 2]
    with pytest.raises(plaindata.PlainDataError, match="object array"):
        plaindata.dumps(np.array([object()], dtype=object))


def test_scan_state_round_trips_as_plain_data(demo_cfg, subject, one_torch_thread):
    from reverie.stages.scan.stage import CHECKPOINT_CLASSES, scan_pass

    cfg = load_config(DEMO_CONFIG, {"scan.max_tokens": 800, "scan.batch_size": 4, "scan.top_k": 4, "scan.window_search_top": 4})
    state = scan_pass(cfg, subject, [5, 9], progress=False)
    back = plaindata.loads(plaindata.dumps(state, CHECKPOINT_CLASSES), CHECKPOINT_CLASSES)
    _same(back, state)
    assert back.corpus_counts["documents"] > 0


def _same(a, b, path="state"):
    """Deep equality with types: the same classes, containers, array dtypes and values."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__"):
        _same(vars(a), vars(b), path)
    else:
        assert a == b or (a != a and b != b), (path, a, b)


_UNSAFE = [
    (re.compile(r"\b(?:c?pickle|dill|cloudpickle|joblib|shelve|marshal)\.loads?\b|\bUnpickler\b"), "unpickling"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def test_no_code_is_loaded_from_the_store_or_the_corpus():
    """Grep rule: no unpickling, no torch.load without weights_only=True, no numpy allow_pickle in
    the project's code (tests may unpickle objects they pickled themselves)."""
    bad = []
    for f in sorted(REPO.rglob("*.py")):
        rel = f.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests", "build", "dist") or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pat, what in _UNSAFE:
                if pat.search(code):
                    bad.append(f"{rel}:{n}: {what}: {line.strip()}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- 2. corpora as they come


def _write_bad_corpus(path: Path, shared: Path) -> list[str]:
    good = [json.loads(l)["text"] for l in (shared / "corpora" / "tinystories-heldout.jsonl").read_text().splitlines()[:40]]
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines.insert(3, b'{"text": "A cat sat \xff\xfe on the mat."}')                 # 2 invalid UTF-8 bytes
    lines.insert(5, b'{"text": "broken json')                                      # unparsable
    lines.insert(7, json.dumps({"meta": {"source": "no text here"}}).encode())     # no text field
    lines.insert(9, b'{"text": "Lone \\ud800 surrogate and \\u001b[31m escape \\u0007 bell."}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good


def test_bad_byte_bad_lines_and_lone_surrogate_are_skipped_or_cleaned_and_counted(tmp_path, shared, subject):
    from reverie.sae_targets.contexts import iter_contexts

    corpus = tmp_path / "bad.jsonl"
    good = _write_bad_corpus(corpus, shared)
    cfg = load_config(DEMO_CONFIG, {"scan.corpus.path": str(corpus)})
    stats = CorpusStats()
    docs = list(iter_documents(cfg.scan.corpus, stats=stats))
    assert len(docs) == len(good) + 2
    assert stats.counts == {"documents": len(good) + 2, "bad_lines": 1, "no_text": 1, "bad_bytes": 2, "cleaned_chars": 3}
    assert "A cat sat \ufffd\ufffd on the mat." in docs
    assert "Lone \ufffd surrogate and [31m escape  bell." in docs
    # the tokenizer takes every document (a lone surrogate used to raise TypeError there)
    ctxs = list(iter_contexts(subject, docs, 64))
    assert {c.doc_idx for c in ctxs} == set(range(len(docs)))
    # scan.on_bad_document = "fail" names the file and line
    with pytest.raises(LoadError, match=r"bad\.jsonl:6 is not valid JSON .* scan\.on_bad_document = \"skip\""):
        list(iter_documents(cfg.scan.corpus, on_bad="fail"))


def test_scan_stores_the_corpus_counts_and_the_index_shows_them(tmp_path, shared, subject, one_torch_thread):
    from reverie.reports.data import _Reader, _scan_info
    from reverie.sae_targets.selection import Target
    from reverie.stages.scan import run_scan

    corpus = tmp_path / "bad.jsonl"
    _write_bad_corpus(corpus, shared)
    cfg = load_config(DEMO_CONFIG, {"project.dir": str(tmp_path / "p"), "scan.corpus.path": str(corpus), "scan.max_tokens": 3000,
                                    "scan.batch_size": 8, "scan.top_k": 4, "scan.window_search_top": 4, "scan.window_ce_samples": 16,
                                    "scan.baseline_prompts": 16, "scan.random_prompt_examples": 2, "targets.combinations": []})
    with Store(cfg.project.path) as store:
        sid = run_scan(cfg, subject, store, [Target([5])], progress=False)
        row = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [sid])
        assert row["status"] == "done"
        assert (row["corpus_bad_lines"], row["corpus_no_text"], row["corpus_bad_bytes"], row["corpus_cleaned_chars"]) == (1, 1, 2, 3)
        info = _scan_info(_Reader(store), sid, "comparison")
    assert "2 skipped (1 unparsable lines, 1 without text); 2 invalid UTF-8 bytes replaced; 3 control characters" in info.corpus_note


# ----------------------------------------------------------------------------- 3. content-addressed inputs, NaN


def test_changed_sae_file_is_a_new_scan_key(tmp_path, subject, monkeypatch):
    from reverie.pipeline.hashing import SAE_FILES
    from reverie.pipeline.paths import expand
    from reverie.sae_targets.loading import input_sha
    from reverie.stages.scan import scan_key

    monkeypatch.setenv("REVERIE_HASH_CACHE", str(tmp_path / "hashes.json"))
    sae_dir = tmp_path / "sae"
    shutil.copytree(expand(SAE_DIR), sae_dir)
    for f in sae_dir.iterdir():
        f.chmod(0o644)
    cfg = load_config(DEMO_CONFIG)
    before = input_sha(str(sae_dir), SAE_FILES)
    assert input_sha(str(sae_dir), SAE_FILES) == before                   # cached: the same answer
    assert json.loads((tmp_path / "hashes.json").read_text())             # ... persisted for the next process
    w = sae_dir / "sae_weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"                                        # one float32 becomes NaN, same size, same path
    w.write_bytes(bytes(data))
    after = input_sha(str(sae_dir), SAE_FILES)
    assert after != before
    k1 = scan_key(cfg, dataclasses.replace(subject, sae_key=str(sae_dir), sae_sha=before), [5])
    k2 = scan_key(cfg, dataclasses.replace(subject, sae_key=str(sae_dir), sae_sha=after), [5])
    assert k1 != k2
    assert subject.sae_sha and subject.model_sha and not subject.sae_sha.startswith("name:")


def test_nan_weights_fail_check_fit_with_a_clear_message(subject):
    from reverie.sae_targets.loading import check_fit

    sae = copy.deepcopy(subject.sae)
    with torch.no_grad():
        sae.W_enc[0, :3] = float("nan")
        sae.b_dec[0] = float("inf")
    with pytest.raises(LoadError, match=r"the SAE \(.*jumprelu-2048\) holds NaN/Inf weights: .*restore or retrain") as e:
        check_fit(subject.model, sae, subject.model_key)
    assert "W_enc (3 of 262144 values)" in str(e.value) and "b_dec (1 of 128 values)" in str(e.value)


def test_nan_activations_fail_the_scan_unit(demo_cfg, subject, monkeypatch):
    import reverie.stages.scan.stage as scan_stage

    real = scan_stage.rank_and_post

    def nan_acts(*a, **k):
        rank, post = real(*a, **k)
        rank[0, 1, 0] = float("nan")
        return rank, post

    monkeypatch.setattr(scan_stage, "rank_and_post", nan_acts)
    cfg = load_config(DEMO_CONFIG, {"scan.max_tokens": 300, "scan.batch_size": 2})
    with pytest.raises(FloatingPointError, match=r"NaN/Inf latent activations .*latent 5"):
        scan_stage.scan_pass(cfg, subject, [5, 9], progress=False)


# ----------------------------------------------------------------------------- 4. disks


def test_failed_write_is_one_store_write_error_naming_path_and_free_space(tmp_path, monkeypatch):
    with Store(tmp_path / "p") as store:
        store.start_run("r1", "test", "{}", "0")  # committed before the failure: kept

        def full(*a, **k):
            raise duckdb.IOException('IO Error: Could not write file "reverie.duckdb.wal": No space left on device')

        monkeypatch.setattr(store, "conn", _FailingConn(store.conn, full))
        with pytest.raises(StoreWriteError) as e:
            store.replace("targets", {"run_id": "r1"}, [])
        msg = str(e.value)
        assert str(store.path) in msg and "No space left on device" in msg and re.search(r"\d+\.\d (GiB|MiB|KiB) free on ", msg)
        assert "rerun the same command" in msg and e.value.exit_code == 1
        assert e.value.__cause__ is None and e.value.__suppress_context__
    with Store(tmp_path / "p", read_only=True) as s:
        assert s.fetch_one("SELECT status FROM runs WHERE run_id = 'r1'")["status"] == "running"


class _FailingConn:
    """A DuckDB connection whose writes fail (reads and transaction control still work)."""

    def __init__(self, conn, fail):
        self._conn, self._fail = conn, fail

    def execute(self, sql, *a, **k):
        if sql.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE")):
            self._fail()
        return self._conn.execute(sql, *a, **k)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_disk_full_during_a_nightly_is_one_message(tmp_path, monkeypatch):
    """The nightly's targets write fails: one line on the terminal (no traceback, no chain of
    failures recorded for units), exit code 1, the run row (committed earlier) kept."""
    from reverie.pipeline import store as store_mod

    real_replace = store_mod.Store.replace

    def replace(self, table, where, rows):
        if table == "targets":  # DuckDB fails the write; the store turns it into one StoreWriteError
            with self._writing():
                raise duckdb.IOException('IO Error: Could not write file "reverie.duckdb": No space left on device')
        return real_replace(self, table, where, rows)

    monkeypatch.setattr(store_mod.Store, "replace", replace)
    project = tmp_path / "p"
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run-id", "full",
                            "--set", "explain.enabled=false"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errors = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "cannot write to" in errors[0] and "free on" in errors[0] and "No space left" in errors[0]
    with Store(project, read_only=True) as s:
        row = s.fetch_one("SELECT status, error FROM runs WHERE run_id = 'full'")
        assert row["status"] == "failed" and "StoreWriteError" in row["error"]
        assert not s.fetch("SELECT * FROM units WHERE status = 'failed'")  # the write failure is not a unit failure


# ----------------------------------------------------------------------------- 6. clear errors, exit 2, before the model loads


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if anything loads the model."""
    import reverie.sae_targets.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_subject", boom)


@pytest.mark.parametrize("args, message", [
    (["dream", "--latent", "552", "--latent", "552", "--combine", "lp"], "repeats latent(s) [552]"),
    (["targets", "--set", "targets.combinations=[[552, 552]]"], "repeats latent(s) [552]"),
    (["targets", "--latent", "99999"], "latent ids [99999] do not exist: this SAE has d_sae = 2048"),
    (["targets", "--set", "targets.combinations=[[5, 4096]]"], "latent ids [4096] do not exist"),
    (["nightly", "--latent-ignored"], None),  # placeholder replaced below
])
def test_bad_targets_exit_2_before_the_model_loads(args, message, tmp_path, no_model_load):
    if message is None:
        args, message = ["nightly", "--run-id", "t", "--set", "targets.n_random=0", "--set", "targets.combinations=[]"], "nothing to explain"
    r = runner.invoke(app, [*args, "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path / "p")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and "the model was loaded" not in r.output


def test_unsafe_run_id_is_refused_before_any_file_is_written(tmp_path, no_model_load):
    project = tmp_path / "a" / "b" / "p"
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run-id", "../../x"])
    assert r.exit_code == 2 and "run id '../../x' is not allowed" in r.output and "--run-id nightly-test" in r.output
    assert not (tmp_path / "a" / "x.log").exists() and not (project / "logs").exists()
    r = runner.invoke(app, ["config", "show", "--config", str(DEMO_CONFIG), "--set", "run.run_id=a/b"])
    assert r.exit_code == 2 and "is not allowed" in r.output


def test_project_dir_under_a_file_and_a_random_bytes_database(tmp_path, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(blocker / "p"), "--run-id", "r"])
    assert r.exit_code == 2 and "a file is in the way" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "reverie.duckdb").write_bytes(os.urandom(8192))
    r = runner.invoke(app, ["nightly", "--config", str(DEMO_CONFIG), "--project-dir", str(bad), "--run-id", "r"])
    assert r.exit_code == 2 and "is not a readable reverie database" in r.output and "Move it aside" in r.output
    assert "one writer process" not in r.output


def test_set_flag_errors_are_attributed_to_the_flag(tmp_path):
    r = runner.invoke(app, ["config", "show", "--config", str(DEMO_CONFIG), "--set", "dream.iterations=many"])
    assert r.exit_code == 2 and "given on the command line, --set dream.iterations=" in r.output
    assert f"not in {DEMO_CONFIG}" in r.output


def test_sae_without_cfg_json_and_model_without_config_json_say_how_to_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["targets", "--config", str(DEMO_CONFIG), "--latent", "5", "--set", f"sae.path={empty}"])
    assert r.exit_code == 2 and "has no cfg.json" in r.output and "Set sae.path to a folder saved by sae-lens" in r.output
    r = runner.invoke(app, ["targets", "--config", str(DEMO_CONFIG), "--latent", "5", "--set", f"model.path={empty}"])
    assert r.exit_code == 2 and "has no config.json" in r.output and "Set model.path to the folder" in r.output


def test_error_text_is_escaped_and_tracebacks_only_with_debug(tmp_path, monkeypatch):
    r = runner.invoke(app, ["targets", "--config", str(DEMO_CONFIG), "--set", "model.path=/nonexistent/\x1b[31mred\x07"])
    assert r.exit_code == 2 and "\x1b" not in r.output and "\x07" not in r.output and "\\u001b[31mred\\u0007" in r.output
    import reverie.pipeline.cli_project as cli  # config show lives there

    def broken(*a, **k):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(cli, "dump_toml", broken)
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 1 and "RuntimeError: something unexpected" in r.output and "--debug" in r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    r = runner.invoke(app, ["--debug", "config", "show"])
    assert isinstance(r.exception, RuntimeError)  # --debug lets the traceback through


def dt_now():
    from reverie.pipeline.store import now

    return now()
