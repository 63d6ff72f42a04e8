"""Prompts for drafting and scoring explanations, and robust parsing of the answers.

Activation marks: the format of Bills et al. (2023), "Language models can explain neurons in
language models" — every token on its own line as ``token<TAB>activation``, the activation an
integer 0–10 equal to ``floor(10 · a / a_max)`` clipped to [0, 10], where ``a_max`` is the largest
activation among the sequences shown in that prompt (for dataset examples this is the latent's
top activation; for source 'both' dreams and dataset examples share one scale, so the LLM can see
that dreams may exceed the dataset maximum). Sequences are wrapped in ``<start>`` / ``<end>``;
newlines and tabs inside a token are written as ``\\n`` and ``\\t`` so one line stays one token.
We chose this over highlighted spans because it keeps graded strengths, which matter for dreams
whose tokens contribute unequally.

Detection scoring follows EleutherAI's delphi (Paulo et al. 2024, §3): the scorer sees only the
explanation and a numbered batch of plain texts, and answers a list of 0/1 labels.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

from reverie.stages.explain.inputs import Example

Message = dict[str, str]

EXPLAIN_SYSTEM = (
    "You are studying latents (features) of a sparse autoencoder trained on a language model's residual stream. "
    "Each latent responds to some particular pattern in text. You will see token sequences with the latent's "
    "activation on each token, one token per line as `token<TAB>activation`, where activation is an integer from "
    "0 (inactive) to 10 (the strongest activation shown). Each sequence is wrapped in <start> and <end>; newlines "
    "inside a token are written as \\n.\n\n"
    "Work out what the latent responds to: which tokens it is active on, and in which contexts. Reply with one line "
    "that starts with \"Explanation:\" followed by a single concise sentence (at most 30 words)."
)

DETECT_SYSTEM = (
    "You are studying latents (features) of a sparse autoencoder trained on a language model. You will get an "
    "explanation of what one latent responds to, then numbered text examples, one per line (newlines inside an "
    "example are written as \\n). For each example decide, judging only from the explanation, whether the latent is "
    "active somewhere in it. Some examples are active and some are not. Answer with the labels as a JSON list of "
    "0 (not active) and 1 (active), one per example in order, in the form `Labels: [1, 0, 0, 1]`, and nothing else."
)

DATASET_HEADER = "Dataset examples (real text: the latent's top activations and samples across its activation range):"
DREAMS_HEADER = ("Dream prompts (short token sequences optimized to activate the latent; they may be ungrammatical, "
                 "but which tokens are marked, and how strongly, is real):")

MAX_EXPLANATION_CHARS = 400


class ParseError(ValueError):
    """An LLM answer could not be read (the message quotes the start of the answer)."""


class UnusableAnswer(ParseError):
    """An LLM answer that must not be used: empty, a refusal, or longer than ``explain.max_answer_chars``.
    Recorded as a failure (``explain_failures``), never as an explanation or a baseline."""


# a refusal opens the answer (or its explanation sentence); narrow on purpose, so that an explanation that merely
# mentions apologies ("fires on 'sorry' in dialogue") is not taken for one
_REFUSAL = re.compile(
    r"^\W*(?:explanation\s*[:\-–]\s*)?(?:"
    r"(?:i['’]?m|i am) (?:so |very |really )?sorry\b|sorry,? (?:but )?i\b|i apologi[sz]e\b|my apologies\b|unfortunately,? i\b"
    r"|as an ai\b|as a language model\b"
    r"|i (?:can(?:no|['’])t|can not|won['’]t|will not|am unable to|['’]m unable to|am not able to|['’]m not able to)"
    r" (?:help|assist|comply|provide|do|answer|fulfil|complete|determine|identify|tell|see)\b"
    r")", re.I)


def quote_start(text: str, n: int = 80) -> str:
    """The start of an answer for a failure message: at most ``n`` characters, repr-quoted (escapes shown)."""
    return repr(text[:n] + ("…" if len(text) > n else ""))


def check_answer(text: str | None, answer_chars: int | None, max_chars: int) -> str:
    """Reject an LLM answer that must not be used.

    Args:
        text: the answer (possibly already cut to ``max_chars``).
        answer_chars: the answer's length as received (None: ``len(text)``).
        max_chars: ``explain.max_answer_chars``.
    Returns:
        ``text`` unchanged when usable.
    Raises:
        UnusableAnswer: empty (or whitespace only), over-long (received > ``max_chars``), or a refusal
            ("I'm sorry, but I can't help ...", "As an AI ..."); the message says which and quotes the start.
    """
    text = text or ""
    received = len(text) if answer_chars is None else int(answer_chars)
    if not text.strip():
        raise UnusableAnswer("empty answer: the model returned no text")
    if received > max_chars:
        raise UnusableAnswer(f"over-long answer: {received:,} characters > explain.max_answer_chars = {max_chars:,} "
                             f"(kept only its first {max_chars:,}); it starts {quote_start(text)}")
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if _REFUSAL.search(text.strip()) or (lines and _REFUSAL.search(lines[-1].strip())):
        raise UnusableAnswer(f"refusal: the model declined the task; the answer starts {quote_start(text.strip())}")
    return text


def escape_token(token: str) -> str:
    """Raw text as one printable line, in the display convention of
    :func:`sae_targets.tokens.display_text` (backslash, newline, carriage return, tab and other
    control characters escaped)."""
    from reverie.sae_targets.tokens import display_text

    return display_text(token)


def activation_marks(acts: Sequence[float], a_max: float) -> list[int]:
    """Bills et al. (2023) discretization: ``floor(10 · a / a_max)`` clipped to [0, 10].

    Args:
        acts: per-token activations (any real numbers; negatives become 0).
        a_max: the scale (> 0); with ``a_max ≤ 0`` every mark is 0.
    """
    if not a_max > 0:
        return [0] * len(acts)
    return [min(10, max(0, math.floor(10.0 * a / a_max))) for a in acts]


def format_marked(example: Example, a_max: float) -> str:
    """One example as ``<start>`` / ``token<TAB>mark`` lines / ``<end>``."""
    from reverie.sae_targets.tokens import visible

    # tokens are display pieces (sae_targets.tokens): shown as they are, raw control characters escaped
    lines = [f"{visible(t)}\t{m}" for t, m in zip(example.tokens, activation_marks(example.acts, a_max))]
    return "<start>\n" + "\n".join(lines) + "\n<end>"


def explanation_messages(dataset: Sequence[Example], dreams: Sequence[Example], note: str | None = None) -> list[Message]:
    """Chat messages asking for a one-sentence explanation of a latent.

    Args:
        dataset: dataset examples to show (may be empty).
        dreams: dream prompts to show (may be empty; not both empty).
        note: an extra line for the LLM (e.g. that a combination target shows one latent's examples).
    Raises:
        ValueError: nothing to show.
    """
    if not dataset and not dreams:
        raise ValueError("an explanation prompt needs dataset examples or dreams")
    a_max = max((max(e.acts, default=0.0) for e in (*dataset, *dreams)), default=0.0)
    parts = []
    if note:
        parts.append(f"Note: {note}.")
    for header, examples in ((DATASET_HEADER, dataset), (DREAMS_HEADER, dreams)):
        if examples:
            body = "\n\n".join(f"Example {i}:\n{format_marked(e, a_max)}" for i, e in enumerate(examples, 1))
            parts.append(f"{header}\n\n{body}")
    parts.append("Reply with one line: Explanation: <one sentence>.")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def labels_response_format(n: int, style: str) -> dict[str, Any] | None:
    """The ``response_format`` that constrains a scorer's answer to ``{"labels": [n × 0|1]}``.

    Args:
        n: labels wanted (the batch size).
        style: ``explain.label_format``: 'text' (no constraint), 'json_schema' (OpenAI structured
            outputs, also vLLM), 'llama_cpp_schema' (llama-cpp-python's ``json_object`` + ``schema``,
            which it compiles to a grammar).
    Returns:
        The request field, or None for 'text'. The answer still goes through :func:`parse_labels`
        (the bracketed list is its first rule), so a server that ignores the field is read as text.
    Raises:
        ValueError: an unknown style.
    """
    if style == "text":
        return None
    schema = {"type": "object", "additionalProperties": False, "required": ["labels"],
              "properties": {"labels": {"type": "array", "items": {"type": "integer", "enum": [0, 1]}, "minItems": n, "maxItems": n}}}
    if style == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "labels", "strict": True, "schema": schema}}
    if style == "llama_cpp_schema":
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"unknown explain.label_format {style!r}; use 'text', 'json_schema' or 'llama_cpp_schema'")


def detection_messages(explanation: str, texts: Sequence[str]) -> list[Message]:
    """Chat messages asking the scorer to label each text as active (1) or not (0)."""
    lines = "\n".join(f"Example {i}: {escape_token(t)}" for i, t in enumerate(texts, 1))
    user = f"Explanation: {explanation}\n\nExamples:\n{lines}\n\nAnswer with exactly {len(texts)} labels."
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


# a quoted marker ("... start with "Explanation:" followed by ...") is an echo of the instructions, not an answer
# (SmolLM2-135M does this): the marker must not sit inside quotes
_MARKER = re.compile(r"(?<![\"'`“‘])\bexplanation\s*[:\-–](?![\"'`”’])\s*", re.I)
_WRAP = "\"'`*_ “”‘’"


def parse_explanation(answer: str) -> str:
    """The explanation sentence in an LLM answer.

    Takes the text after the last ``Explanation:`` marker (any case), or, without a marker, the
    last non-empty line; strips Markdown emphasis and quotes, collapses whitespace and caps the
    length at 400 characters (cut at a word).

    Raises:
        ParseError: the answer is empty or holds no text.
    """
    text = (answer or "").strip()
    marks = list(_MARKER.finditer(text))
    if marks:
        text = text[marks[-1].end():]
        lines = [l for l in text.splitlines() if l.strip()]
        text = lines[0] if lines else ""
    else:
        lines = [l for l in text.splitlines() if l.strip()]
        text = lines[-1] if lines else ""
    text = " ".join(text.split()).strip(_WRAP).strip()
    if len(text) > MAX_EXPLANATION_CHARS:
        text = text[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0] + "…"
    if not text:
        raise ParseError(f"no explanation in the answer {(answer or '')[:200]!r}")
    return text


_TRUE = {"1", "true", "yes", "active", "y"}
_FALSE = {"0", "false", "no", "inactive", "n"}
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LEADING_WORD = re.compile(r"^\W*(?:final\s+)?(?:labels?|answers?)\b\W*?[:\-–]?", re.I)
_NUMBERING = re.compile(r"(?m)^\s*(?:example\s*)?\d+\s*[.):]\s+(?=\S)", re.I)
_PER_LINE = re.compile(r"example\s*(\d+)\s*[:=\-–]?\s*(1|0|yes|no|true|false|inactive|active)\b", re.I)


def _label(value: object) -> bool | None:
    s = str(value).strip().strip("\"'").lower()
    return True if s in _TRUE else False if s in _FALSE else None


def parse_labels(answer: str, n: int) -> list[bool]:
    """Read ``n`` firing labels from a scorer's answer.

    Tries, in order: the last bracketed list with exactly ``n`` readable labels (JSON or bare words:
    0/1, true/false, yes/no); ``Example k: 1`` lines covering 1..n; exactly ``n`` standalone 0/1
    digits when the answer holds nothing else (besides a leading ``Labels:``, line numbering and
    separators; digits inside prose are no labels).

    Raises:
        ParseError: none of these gives ``n`` labels.
    """
    text = answer or ""
    for m in reversed(_BRACKETS.findall(text)):
        try:
            items = json.loads(m)
        except json.JSONDecodeError:
            items = [x for x in re.split(r"[,\s]+", m.strip("[]")) if x]
        if isinstance(items, list) and len(items) == n:
            labels = [_label(x) for x in items]
            if all(l is not None for l in labels):
                return [bool(l) for l in labels]
    per = {int(k): _label(v) for k, v in _PER_LINE.findall(text)}
    if all(i in per for i in range(1, n + 1)):
        return [bool(per[i]) for i in range(1, n + 1)]
    # bare digits only when the answer holds nothing else (besides a "Labels:" word, numbering and separators): digits
    # inside prose ("a JSON list of 0 (not active) and 1 (active)", an echo of the instructions) are no labels
    bare = _NUMBERING.sub("", _LEADING_WORD.sub("", text.strip(), count=1))
    digits = re.findall(r"(?<![\w.])[01](?![\w.])", bare)
    if len(digits) == n and not re.sub(r"[\s,;\[\]()01]", "", bare):
        return [d == "1" for d in digits]
    raise ParseError(f"could not read {n} labels from the answer {text[:200]!r}")
