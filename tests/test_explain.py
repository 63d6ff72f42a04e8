"""Explain stage, pure parts: activation marks, prompts, answer parsing, metrics, splits, availability."""

from __future__ import annotations

import pytest

from reverie.pipeline.config import load_config
from reverie.stages.explain import explain_available
from reverie.stages.explain.client import REDACTED, Budget, BudgetExceeded, cache_key, redact, retry_after_s, retryable
from reverie.stages.explain.inputs import Example, spread, split_dataset, split_dreams
from reverie.stages.explain.prompts import (
    ParseError, activation_marks, detection_messages, explanation_messages, format_marked, parse_explanation, parse_labels,
)
from reverie.stages.explain.scoring import detection_metrics


def ex(tokens, acts, kind="top"):
    return Example(tuple(tokens), tuple(acts), kind, max(acts), max(acts) > 0)


def test_activation_marks_bills_scale():
    assert activation_marks([0.0, 1.0, 2.5, 5.0, -3.0, 7.0], 5.0) == [0, 2, 5, 10, 0, 10]
    assert activation_marks([1.0, 2.0], 0.0) == [0, 0]


def test_format_marked_one_token_per_line_and_escapes():
    out = format_marked(ex(["Once", " upon", "\n", " cat"], [0.0, 0.5, 0.0, 2.0]), 2.0)
    assert out.splitlines() == ["<start>", "Once\t0", " upon\t2", "\\n\t0", " cat\t10", "<end>"]


def test_explanation_prompt_shares_one_scale_across_sources():
    data = [ex(["The", " cat"], [0.0, 2.0])]
    dreams = [ex([" cat", " cat"], [4.0, 1.0], "dream")]
    msgs = explanation_messages(data, dreams, note="dataset examples are those of latent 3")
    user = msgs[1]["content"]
    assert msgs[0]["role"] == "system" and "Explanation:" in msgs[0]["content"]
    assert "Dataset examples" in user and "Dream prompts" in user and "Note: dataset examples are those of latent 3." in user
    assert " cat\t5" in user and " cat\t10" in user          # dataset max 2.0 is half the dream max 4.0
    assert user.index("Dataset examples") < user.index("Dream prompts")
    with pytest.raises(ValueError):
        explanation_messages([], [])


def test_detection_prompt_numbers_examples():
    msgs = detection_messages("fires on cats", ["a cat\nsat", "a dog"])
    user = msgs[1]["content"]
    assert user.startswith("Explanation: fires on cats")
    assert "Example 1: a cat\\nsat\nExample 2: a dog" in user and "exactly 2 labels" in user
    assert "labels" in msgs[0]["content"].lower()


@pytest.mark.parametrize("answer, expected", [
    ("Explanation: fires on the word \"cat\".", "fires on the word \"cat\"."),
    ("Let me think.\n**Explanation:** *the token ' cat' after an article*\nDone.", "the token ' cat' after an article"),
    ("Some analysis first.\nThe latent fires on animal nouns.", "The latent fires on animal nouns."),
    ("explanation - closing quotation marks", "closing quotation marks"),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


def test_parse_explanation_rejects_empty_and_caps_length():
    for bad in ("", "   \n ", "Explanation: ** **"):
        with pytest.raises(ParseError):
            parse_explanation(bad)
    long = parse_explanation("Explanation: " + "word " * 200)
    assert len(long) <= 401 and long.endswith("…")


@pytest.mark.parametrize("answer, n, expected", [
    ("Labels: [1, 0, 0, 1]", 4, [True, False, False, True]),
    ("I think [0, 1] hmm. Final: [true, false, true]", 3, [True, False, True]),
    ("[yes, no]", 2, [True, False]),
    ("Example 1: 1\nExample 2: no\nExample 3: active", 3, [True, False, True]),
    ("1 0 1", 3, [True, False, True]),
])
def test_parse_labels(answer, n, expected):
    assert parse_labels(answer, n) == expected


@pytest.mark.parametrize("answer", ["Labels: [1, 0]", "", "I cannot tell.", "[1, 2, 0]"])
def test_parse_labels_rejects_wrong_answers(answer):
    with pytest.raises(ParseError):
        parse_labels(answer, 3)


def test_detection_metrics_by_hand():
    truth = [True, True, True, True, False, False, False, False, False, False]
    pred = [True, True, True, False, True, False, False, False, False, False]
    m = detection_metrics(truth, pred)
    # TPR 3/4, TNR 5/6 -> BA 19/24; precision 3/4; F1 2*3/(2*3+1+1)
    assert m.balanced_accuracy == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m.precision == pytest.approx(0.75) and m.recall == pytest.approx(0.75)
    assert m.f1 == pytest.approx(6 / 8)
    assert (m.n, m.n_pos, m.n_neg) == (10, 4, 6)
    chance = detection_metrics([True, False], [False, False])
    assert chance.balanced_accuracy == 0.5 and chance.f1 == 0.0 and chance.precision == 0.0
    with pytest.raises(ValueError):
        detection_metrics([True, True], [True, False])
    with pytest.raises(ValueError):
        detection_metrics([True], [True, False])


def test_cache_key_covers_model_messages_and_params():
    msgs = [{"role": "user", "content": "hi"}]
    k = cache_key("m", msgs, {"temperature": 0.0})
    assert k == cache_key("m", [dict(m) for m in msgs], {"temperature": 0.0}) and len(k) == 64
    assert len({k, cache_key("m2", msgs, {"temperature": 0.0}), cache_key("m", msgs, {"temperature": 1.0}),
                cache_key("m", [{"role": "user", "content": "hi!"}], {"temperature": 0.0})}) == 4


def test_redact_and_budget():
    assert redact("Bearer sk-abc and sk-abc", "sk-abc", None, "") == f"Bearer {REDACTED} and {REDACTED}"
    b = Budget(max_tokens=100)
    b.check()
    b.add(100, 0.01)
    with pytest.raises(BudgetExceeded, match="100 tokens"):
        b.check()
    with pytest.raises(BudgetExceeded, match="budget_usd"):
        Budget(max_usd=0.01, usd=0.02).check()


def test_retry_classification():
    import json as _json

    import httpx2
    import openai

    req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")

    def status(code, headers=None):
        return openai.APIStatusError("x", response=httpx2.Response(code, request=req, headers=headers or {}), body=None)

    assert retryable(status(429)) and retryable(status(500)) and retryable(status(503))
    assert not retryable(status(400)) and not retryable(status(401))
    assert retryable(openai.APITimeoutError(req)) and retryable(openai.APIConnectionError(request=req))
    assert retryable(_json.JSONDecodeError("x", "{", 0)) and not retryable(KeyError("x"))
    assert retry_after_s(status(429, {"retry-after": "2"})) == 2.0
    assert retry_after_s(status(429, {"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after_s(status(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert retry_after_s(KeyError("x")) is None


def _row(kind, rank, text_tokens, acts, bin_=None, post=None):
    return {"kind": kind, "rank": rank, "bin": bin_, "tokens": text_tokens, "acts": acts, "max_act": max(acts), "post_acts": post}


def test_split_dataset_disjoint_and_balanced():
    rows = [_row("top", r, ["A", f" w{r}", " cat"], [0.0, 0.0, 5.0 - r * 0.1]) for r in range(10)]
    rows += [_row("quantile", r, ["B", f" q{b}{r}", " cat"], [0.0, 0.0, 0.2 + 0.4 * b], b) for b in range(10) for r in range(2)]
    rows += [_row("random", r, ["C", f" r{r}", " dog"], [0.0, 0.0, 0.0]) for r in range(8)]
    rows.append(_row("top", 99, ["A", " w0", " cat"], [0.0, 0.0, 1.0]))            # duplicate text: dropped
    shown, held = split_dataset(rows, n_examples=8, n_holdout=5)
    assert len(shown) == 8 and [e.kind for e in shown].count("quantile") == 2
    assert [e.text for e in shown[:6]] == [f"A w{r} cat" for r in range(6)]
    pos = [h for h in held if h.fires]
    neg = [h for h in held if not h.fires]
    assert len(pos) == 5 and len(neg) == 5
    assert not {h.text for h in held} & {e.text for e in shown}
    assert all(h.text.startswith("B") for h in pos) and all(h.text.startswith("C") for h in neg)
    assert len({h.text[3] for h in pos}) == 5                                      # spread over 5 deciles


def test_split_dataset_labels_by_post_activation():
    """Pre-activations rank and mark; post-activations decide which held-out examples fire."""
    rows = [_row("top", 0, ["A", " cat"], [-1.0, 3.0], post=[0.0, 3.0])]
    rows += [_row("quantile", r, ["B", f" q{r}", " cat"], [0.0, 0.0, 1.0], 0, post=[0.0, 0.0, 1.0 if r != 1 else 0.0]) for r in range(6)]
    rows += [_row("random", 0, ["C", " dog"], [0.4, -1.0], post=[0.0, 0.0]),        # positive pre, not firing: a negative
             _row("random", 1, ["C", " cow"], [0.6, 0.2], post=[0.6, 0.0])]         # fires after all: excluded
    shown, held = split_dataset(rows, n_examples=4, n_holdout=5)
    assert [h.text for h in held if h.fires] == ["B q3 cat", "B q5 cat"]            # q1 does not fire: dropped
    assert [h.text for h in held if not h.fires] == ["C dog"]


def test_split_dreams_alternates_and_uses_nonfiring_negatives():
    rows = [{"tokens": [" a", f" d{i}", " cat"], "activation": 10.0 - i, "token_acts": [0.0, 1.0, 10.0 - i]} for i in range(8)]
    rows.append({"tokens": [" weak"], "activation": -1.0, "token_acts": None})
    rows.append({"tokens": [" a", " d0", " cat"], "activation": 3.0, "token_acts": None})  # same text as a better dream
    negatives = [ex([" x", f" y{i}"], [-0.5, -0.2 if i else 0.3], "random_prompt") for i in range(4)]
    shown, held = split_dreams(rows, negatives, n_examples=10, n_holdout=3)
    assert [e.text for e in shown] == [" a d0 cat", " a d2 cat", " a d4 cat", " a d6 cat"]
    assert [h.text for h in held if h.fires] == [" a d1 cat", " a d3 cat", " a d5 cat"]
    assert [h.text for h in held if not h.fires] == [" x y1", " x y2", " x y3"]   # the firing random prompt is excluded


def test_spread():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread([1, 2], 5) == [1, 2] and spread([1, 2], 0) == []


def test_explain_available(monkeypatch):
    cfg = load_config(None, {"explain.api_key_env": "REVERIE_TEST_KEY", "explain.base_url": "http://127.0.0.1:9/v1"})
    monkeypatch.delenv("REVERIE_TEST_KEY", raising=False)
    ok, line = explain_available(cfg)
    assert not ok and "$REVERIE_TEST_KEY" in line and "\n" not in line
    monkeypatch.setenv("REVERIE_TEST_KEY", "sk-secret")
    ok, line = explain_available(cfg)
    assert ok and "http://127.0.0.1:9/v1" in line and "sk-secret" not in line
    cfg.explain.enabled = False
    ok, line = explain_available(cfg)
    assert not ok and "enabled" in line
