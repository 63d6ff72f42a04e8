"""What the explain stage shows the LLM: examples read from the scan and dream tables, split into
the part shown when drafting an explanation and the held-out part used for detection scoring.

Contract (tables of other stages): ``targets(run_id, target_id, latents)``,
``dream_runs(dream_id, run_id, target_id)``, ``dream_prompts(dream_id, tokens, activation,
token_acts)``, ``scan_examples(scan_id, latent, kind, rank, bin, tokens, acts, post_acts, max_act)``
with kind ``'top' | 'quantile' | 'random' | 'random_prompt'``.

Activations: marks use ``acts`` (the scan's ranking quantity, ``targets.quantity``: the same
quantity the dream objective and its ``token_acts`` read), so dataset examples and dreams share
one scale. Whether an example *fires* (its held-out label) is decided by the SAE post-activation
(``post_acts`` > 0 somewhere) when stored; without it, by ``max_act`` > 0, except that the scan's
``'random'`` contexts are non-firing by definition. A dream fires when its objective value > 0.

Splits (deterministic, disjoint by text):

* dataset, shown: the top-k examples (by rank) plus a quarter of the slots from the even-indexed
  quantile samples (ordered by decile, then rank);
* dataset, held out: positives = the odd-indexed firing quantile samples spread evenly over
  deciles, negatives = the scan's non-firing ``'random'`` contexts;
* dreams: frontier prompts of every seed with activation > 0, deduplicated by text and ordered by
  activation (descending); even positions are shown, odd positions are held out as positives;
  negatives = the scan's non-firing ``'random_prompt'`` random-token prompts (if the scan
  stored none for this latent, the non-firing ``'random'`` contexts stand in, and the split says so).

A combination target (several latents) uses its first latent's dataset examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from reverie.pipeline.store import Store


@dataclass(frozen=True)
class Example:
    """One token sequence with the latent's activation on each token.

    ``acts`` has one float per token, in the objective's quantity (see the module docstring);
    ``fires``: whether the latent is active on it. ``kind``: 'top', 'quantile', 'random', 'dream'
    or 'random_prompt'.
    """

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    kind: str
    max_act: float
    fires: bool = True

    @property
    def text(self) -> str:
        """The text the tokens stand for: display pieces joined and read back
        (:func:`sae_targets.tokens.from_display`), so ``\\n`` is a newline again."""
        from reverie.sae_targets.tokens import from_display

        return from_display("".join(self.tokens))


@dataclass(frozen=True)
class HeldOut:
    """A held-out example and whether the latent really fires on it.

    ``tokens``: its display pieces; ``active``: per token, whether the latent is active there (the
    SAE post-activation > 0 for dataset examples; for dreams, tokens at ≥ half the dream's largest
    per-token value) — the marks the fuzzing scorer shows; ``hard``: a hard negative (a
    decoder-cosine neighbour fires in its context, this latent does not).
    """

    text: str
    fires: bool
    tokens: tuple[str, ...] = ()
    active: tuple[bool, ...] = ()
    hard: bool = False


def held(e: Example, fires: bool, post: Sequence[float] | None = None, hard: bool = False) -> HeldOut:
    """A :class:`HeldOut` of an example, with its active tokens (``post`` > 0 when given, else
    acts ≥ half of the example's largest positive act)."""
    if post is not None and len(post) == len(e.tokens):
        active = tuple(a is not None and a > 0 for a in post)
    else:
        top = max(e.acts, default=0.0)
        active = tuple(top > 0 and a >= 0.5 * top for a in e.acts)
    return HeldOut(e.text, fires, e.tokens, active, hard)


@dataclass
class TargetInputs:
    """Everything the stage needs for one target (plain data: picklable)."""

    target_id: str
    latents: list[int]
    dataset_shown: list[Example] = field(default_factory=list)
    dreams_shown: list[Example] = field(default_factory=list)
    holdout: dict[str, list[HeldOut]] = field(default_factory=dict)   # 'dataset' | 'dreams' -> examples
    notes: dict[str, str] = field(default_factory=dict)               # what is missing, and why
    wanted: tuple[int, int] = (0, 0)                                  # held-out (activating, non-activating) the settings ask for

    @property
    def dataset_latent(self) -> int:
        """The latent whose dataset examples are used (the first of a combination)."""
        return self.latents[0]


def _example(row: dict[str, Any], kind: str, acts_key: str = "acts") -> Example:
    tokens = tuple(str(t) for t in row["tokens"])
    acts = row.get(acts_key)
    if acts is None or len(acts) != len(tokens):
        # a dream without per-token values: the objective is read at the last token
        value = float(row.get("activation") or 0.0)
        acts = [0.0] * (len(tokens) - 1) + [value] if tokens else []
    acts_t = tuple(float(a) if a is not None else 0.0 for a in acts)
    max_act = float(row["max_act"]) if row.get("max_act") is not None else max(acts_t, default=0.0)
    post = row.get("post_acts")
    if post is not None:
        fires = any(a is not None and a > 0 for a in post)
    else:
        fires = kind != "random" and max_act > 0
    return Example(tokens, acts_t, kind, max_act, fires)


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spaced over ``items`` (all of them when there are at most ``k``)."""
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def _dedupe(examples: Sequence[Example], exclude: set[str] = frozenset()) -> list[Example]:
    seen = set(exclude)
    out = []
    for e in examples:
        if e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


def split_dataset(rows: Sequence[dict[str, Any]], n_examples: int, n_holdout: int, n_negative: int | None = None,
                  hard_share: float = 0.0) -> tuple[list[Example], list[HeldOut]]:
    """Split one latent's ``scan_examples`` rows into shown examples and the held-out set.

    Args:
        n_negative: non-firing examples wanted (None = ``n_holdout``).
        hard_share: share of them taken from ``'hard_negative'`` rows (contexts where a decoder-cosine
            neighbour fires; delphi's neighbour negatives); random non-firing contexts fill the rest,
            and hard negatives fill in when random ones run out.
    Returns:
        (shown: at most ``n_examples``, held-out: at most ``n_holdout`` firing + ``n_negative``
        non-firing, disjoint by text from the shown ones; fewer when the scan holds fewer).
    """
    n_negative = n_holdout if n_negative is None else n_negative
    top = sorted((r for r in rows if r["kind"] == "top"), key=lambda r: r["rank"])
    quantile = sorted((r for r in rows if r["kind"] == "quantile"), key=lambda r: (r["bin"] if r["bin"] is not None else 0, r["rank"]))
    random = sorted((r for r in rows if r["kind"] == "random"), key=lambda r: r["rank"])
    q_shown = [_example(r, "quantile") for r in quantile[0::2]]
    q_held = [_example(r, "quantile") for r in quantile[1::2]]
    n_q = n_examples // 4 if q_shown else 0
    shown = _dedupe([_example(r, "top") for r in top][: n_examples - n_q] + spread(q_shown, n_q))
    shown_texts = {e.text for e in shown}
    q_rows = {id(e): r for e, r in zip(q_held, quantile[1::2])}
    pos = spread(_dedupe([e for e in q_held if e.fires], shown_texts), n_holdout)
    post = {e.text: r.get("post_acts") for e, r in ((e, q_rows.get(id(e), {})) for e in q_held)}
    rand = [(e, r) for e, r in ((_example(r, "random"), r) for r in random) if not e.fires]
    hard_rows = sorted((r for r in rows if r["kind"] == "hard_negative"), key=lambda r: r["rank"])
    hard = [(e, r) for e, r in ((_example(r, "random"), r) for r in hard_rows) if not e.fires]
    n_hard = min(len(hard), round(hard_share * n_negative))
    seen = set(shown_texts)
    neg: list[HeldOut] = []

    def take(group: list[tuple[Example, dict[str, Any]]], is_hard: bool, limit: int) -> None:
        for e, r in group:
            if len(neg) >= limit:
                return
            if e.text not in seen:
                seen.add(e.text)
                neg.append(held(e, False, r.get("post_acts"), hard=is_hard))

    take(hard, True, n_hard)
    take(rand, False, n_negative)
    take(hard, True, n_negative)  # hard negatives fill in when random ones run out
    neg = neg[:n_negative]
    return shown, [held(e, True, post.get(e.text)) for e in pos] + neg


def split_dreams(rows: Sequence[dict[str, Any]], negatives: Sequence[Example], n_examples: int, n_holdout: int) -> tuple[list[Example], list[HeldOut]]:
    """Split a target's frontier prompts into shown dreams and the held-out set.

    Args:
        rows: ``dream_prompts`` rows (tokens, activation, token_acts) of every seed.
        negatives: non-firing comparison prompts (random prompts, or non-firing contexts).
    Returns:
        (shown dreams, held-out: dreams as firing + negatives as non-firing).
    """
    dreams = _dedupe([_example({**r, "max_act": r["activation"]}, "dream", "token_acts")
                      for r in sorted(rows, key=lambda r: -float(r["activation"])) if float(r["activation"]) > 0])
    shown = dreams[0::2][:n_examples]
    held_out = dreams[1::2][:n_holdout]
    texts = {e.text for e in dreams}
    neg = _dedupe([e for e in negatives if not e.fires], texts)[:n_holdout]
    return shown, [held(e, True) for e in held_out] + [held(e, False) for e in neg]


def load_inputs(store: Store, run_id: str, scan_id: str | None, n_examples: int, n_holdout: int, n_negative: int | None = None,
                hard_share: float = 0.0) -> list[TargetInputs]:
    """Read every target of a run with its dataset examples and dreams, split for the stage.

    Args:
        run_id: the run whose ``targets`` rows are explained.
        scan_id: the scan holding the dataset examples (None: no dataset examples).
    Returns:
        One :class:`TargetInputs` per target, in target order; what is missing is in ``notes``.
    """
    targets = store.fetch("SELECT target_id, latents FROM targets WHERE run_id = ? ORDER BY target_id", [run_id])
    out = []
    for t in targets:
        inp = TargetInputs(t["target_id"], [int(x) for x in t["latents"]], wanted=(n_holdout, n_holdout if n_negative is None else n_negative))
        lat = inp.dataset_latent
        rows = store.fetch(
            "SELECT kind, rank, bin, tokens, acts, post_acts, max_act FROM scan_examples WHERE scan_id = ? AND latent = ?", [scan_id, lat]
        ) if scan_id else []
        if len(inp.latents) > 1:
            inp.notes["combination"] = f"dataset examples are those of latent {lat}, the first of {inp.target_id}"
        inp.dataset_shown, held = split_dataset(rows, n_examples, n_holdout, n_negative, hard_share)
        if not inp.dataset_shown:
            inp.notes["dataset"] = f"no dataset examples for latent {lat} in scan {scan_id}" if scan_id else "no scan found for this run"
        if held:
            inp.holdout["dataset"] = held

        dream_rows = store.fetch(
            "SELECT p.tokens, p.activation, p.token_acts FROM dream_prompts p JOIN dream_runs r USING (dream_id) "
            "WHERE r.run_id = ? AND r.target_id = ? ORDER BY p.dream_id, p.idx", [run_id, inp.target_id]
        )
        neg = [_example(r, "random_prompt") for r in rows if r["kind"] == "random_prompt"]
        if not neg and dream_rows:
            neg = [_example(r, "random") for r in rows if r["kind"] == "random"]
            inp.notes["dreams holdout"] = f"no random prompts for latent {lat} in the scan; non-firing contexts used as negatives"
        inp.dreams_shown, held = split_dreams(dream_rows, neg, n_examples, n_holdout)
        if not inp.dreams_shown:
            inp.notes["dreams"] = f"no dream prompts with activation > 0 for target {inp.target_id} in run {run_id}"
        if held:
            inp.holdout["dreams"] = held
        out.append(inp)
    return out
