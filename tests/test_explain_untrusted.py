"""Untrusted LLM text (issue 16 item 5), against the loopback server of tests/fake_openai.py:
refusals, empty and over-long answers are failures (never explanations, never baselines),
answers are capped and stored once, ESC/BEL sequences never reach the terminal raw."""

from __future__ import annotations

import pytest
from fake_openai import ESCAPE_ANSWER, HUGE_CHARS, REFUSAL
from typer.testing import CliRunner

from reverie.pipeline.store import Store
from reverie.stages.explain import run_explain
from reverie.stages.explain.prompts import UnusableAnswer, check_answer
from test_explain_stage import KEY, RUN, SCAN, TRIGGERS, make_cfg, populate, project, server  # noqa: F401 - fixtures


@pytest.mark.parametrize("answer, why", [
    (REFUSAL, "refusal"), ("As an AI language model, I cannot see activations.", "refusal"),
    ("Explanation: I can't determine a pattern from these examples.", "refusal"), ("", "empty"), ("  \n ", "empty"),
])
def test_check_answer_rejects_refusals_and_empty_answers(answer, why):
    with pytest.raises(UnusableAnswer, match=why):
        check_answer(answer, None, 4000)


def test_check_answer_keeps_explanations_that_mention_apologies():
    for ok in ('Explanation: fires on "sorry" in apologies.', 'Here is my analysis.\nExplanation: fires on the words "cat".'):
        assert check_answer(ok, None, 4000) == ok
    with pytest.raises(UnusableAnswer, match="over-long answer: 5,000 characters"):
        check_answer("x" * 4000, 5000, 4000)


def _failures(store, target):
    return store.fetch("SELECT what, why FROM explain_failures WHERE run_id = ? AND target_id = ?", [RUN, target])


def test_refusal_is_a_failure_row_not_an_explanation_nor_a_baseline(project, server):
    cfg, store = project
    server.fail_when("zebra", "refusal")  # every request about target 404 is refused
    summary = run_explain(cfg, store, RUN, SCAN)
    assert summary.stopped is None
    rows = _failures(store, "404")
    assert {r["what"] for r in rows} == {"explain:dataset", "explain:dreams", "explain:both"}
    assert all(r["why"].startswith("refusal: the model declined the task") and "I'm sorry" in r["why"] for r in rows)
    assert not store.fetch("SELECT * FROM explanations WHERE target_id = '404'")
    assert not store.fetch("SELECT * FROM explain_scores WHERE scored_explanation_id LIKE ?", [f"{RUN}/404/%"])
    # every other target still gets its explanations and scores
    assert {r["target_id"] for r in store.fetch("SELECT DISTINCT target_id FROM explanations")} == set(TRIGGERS) - {"404"}


def test_over_long_answer_is_capped_stored_once_and_a_failure(project, server):
    cfg, store = project
    cfg.explain.max_answer_chars = 2000
    server.fail_when("zebra", "huge")
    run_explain(cfg, store, RUN, SCAN)
    rows = _failures(store, "404")
    assert rows and all("over-long answer" in r["why"] and "explain.max_answer_chars = 2,000" in r["why"] for r in rows)
    cached = store.fetch("SELECT length(response_text) AS n, answer_chars FROM llm_cache WHERE answer_chars > 2000")
    assert cached and all(c["n"] == 2000 and c["answer_chars"] >= HUGE_CHARS for c in cached)
    # stored once: the explanation rows point at the cache and keep no second copy of the answer
    exps = store.fetch("SELECT raw_text, prompt_hash FROM explanations")
    assert exps and all(e["raw_text"] is None for e in exps)
    keys = {r["key"] for r in store.fetch("SELECT key FROM llm_cache")}
    assert all(e["prompt_hash"] in keys for e in exps)
    assert max(r["n"] for r in store.fetch("SELECT length(response_text) AS n FROM llm_cache")) <= 2000


def test_escape_sequences_in_an_explanation_are_escaped_on_the_terminal(tmp_path, server):
    from reverie.pipeline.cli import app

    project_dir = tmp_path / "cli-project"
    with Store(project_dir) as store:
        populate(store)
    server.fail_when(" ball", "escape")  # target 202's explanation is laden with ESC / BEL sequences
    res = CliRunner().invoke(app, ["explain", "--project-dir", str(project_dir), "--set", "explain.model=fake-model",
                                   "--set", "explain.backoff_base_s=0.01"],
                             env={"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url})
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    line = [l for l in res.output.splitlines() if l.split()[:2] == ["202", "dataset"]]
    assert len(line) == 1 and "\\u001b[31m" in line[0], res.output
    with Store(project_dir) as store:  # the data keeps what the model said; only the terminal shows it escaped
        text = store.fetch_one("SELECT text FROM explanations WHERE target_id = '202' AND source = 'dataset'")["text"]
    assert "\x1b[31m" in text and ESCAPE_ANSWER.startswith("Explanation:")
