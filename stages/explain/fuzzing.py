"""Fuzzing scorer (EleutherAI delphi; Paulo et al. 2024, "Automatically Interpreting Millions of
Features in LLMs", §3): the scorer sees held-out examples with some tokens marked ``<<like this>>``
and says, for each, whether the marked tokens are what the explanation describes.

Items built from one held-out set (:func:`fuzz_items`, deterministic given the seed):

* every activating example marked at its active tokens → label 1;
* every other activating example also marked at the same number of *inactive* tokens (wrongly
  marked) → label 0 (delphi's mislabelled copies);
* every non-activating example (random or hard negative) marked at the same number of randomly
  chosen tokens as a typical activating example → label 0.

Scores are the same metrics as detection (balanced accuracy, F1, precision, recall) over these
labels, with the same batching (``explain.detection_batch`` items per request) and intervals.
"""

from __future__ import annotations

import random
from typing import Sequence

from reverie.stages.explain.inputs import HeldOut

FUZZ_SYSTEM = (
    "You are studying latents (features) of a sparse autoencoder trained on a language model. You will get an "
    "explanation of what one latent responds to, then numbered text examples, one per line (newlines inside an "
    "example are written as \\n). In each example some tokens are marked like <<this>>. For each example decide, "
    "judging only from the explanation, whether the marked tokens are the ones the latent is active on (1) or are "
    "marked wrongly (0). Answer with the labels as a JSON list, one per example in order, in the form "
    "`Labels: [1, 0, 0, 1]`, and nothing else."
)


def marked_text(tokens: Sequence[str], marks: Sequence[bool]) -> str:
    """The example's text with each marked token wrapped in ``<<`` ``>>`` (consecutive marked tokens
    share one pair); tokens are display pieces, read back with :func:`sae_targets.tokens.from_display`."""
    from reverie.sae_targets.tokens import from_display

    out, open_ = [], False
    for t, m in zip(tokens, marks):
        if m and not open_:
            out.append("<<")
        elif not m and open_:
            out.append(">>")
        open_ = bool(m)
        out.append(t)
    if open_:
        out.append(">>")
    return from_display("".join(out))


def fuzz_items(held: Sequence[HeldOut], seed: int) -> list[tuple[str, bool]]:
    """(marked text, marking is right) items of a held-out set (see the module docstring)."""
    rng = random.Random(seed)
    pos = [h for h in held if h.fires and h.tokens and any(h.active)]
    neg = [h for h in held if not h.fires and h.tokens]
    typical = max(1, round(sum(sum(h.active) for h in pos) / len(pos))) if pos else 1
    items: list[tuple[str, bool]] = []
    for i, h in enumerate(pos):
        items.append((marked_text(h.tokens, h.active), True))
        wrong = [k for k, a in enumerate(h.active) if not a]
        if i % 2 == 1 and wrong:
            pick = set(rng.sample(wrong, min(len(wrong), max(1, sum(h.active)))))
            items.append((marked_text(h.tokens, [k in pick for k in range(len(h.tokens))]), False))
    for h in neg:
        pick = set(rng.sample(range(len(h.tokens)), min(len(h.tokens), typical)))
        items.append((marked_text(h.tokens, [k in pick for k in range(len(h.tokens))]), False))
    return items


def fuzz_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking the scorer whether each example's marks match the explanation."""
    from reverie.stages.explain.prompts import escape_token

    lines = "\n".join(f"Example {i}: {escape_token(t)}" for i, t in enumerate(texts, 1))
    user = f"Explanation: {explanation}\n\nExamples:\n{lines}\n\nAnswer with exactly {len(texts)} labels."
    return [{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": user}]
