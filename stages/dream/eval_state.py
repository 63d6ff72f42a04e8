"""What the dream evaluator (:mod:`stages.dream.evaluator`) hands to EPO and back: :class:`EvalOut`
(f, CE and their per-token terms of B prompts), :class:`ParentState` (what the cached path keeps per
population slot) and :func:`merge_states`; the token ban-list (:func:`banned_ids`), the λ ladder
(:func:`log_lambdas`) and :func:`group_runs` (the runs of rows that share an objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from reverie.pipeline.errors import ConfigError
from reverie.sae_targets.loading import Subject


def group_runs(group: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of equal values: [(value, lo, hi), ...] covering ``group`` in order."""
    g = np.asarray(group)
    if g.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(g)) + 1
    bounds = [0, *cuts.tolist(), g.size]
    return [(int(g[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class EvalOut:
    """Evaluation of B prompts.

    Attributes:
        act: [B] float32, objective f(t).
        ce: [B] float32, mean CE over the scored optimized tokens, nats/token.
        values: [B, n + Q] float32, per-token objective at positions P … T−1.
        ce_terms: [B, n] float32, per-token CE of each optimized token (0 where unscored).
    """

    act: torch.Tensor
    ce: torch.Tensor
    values: torch.Tensor
    ce_terms: torch.Tensor

    @staticmethod
    def cat(parts: list["EvalOut"]) -> "EvalOut":
        return EvalOut(*(torch.cat([getattr(p, f) for p in parts]) for f in ("act", "ce", "values", "ce_terms")))

    def index(self, idx: torch.Tensor) -> "EvalOut":
        return EvalOut(self.act[idx], self.ce[idx], self.values[idx], self.ce_terms[idx])


@dataclass
class ParentState:
    """What the cached path keeps per population slot (all on the model's device).

    Attributes:
        tokens: [M, n] int64 optimized tokens.
        logprobs: [M, n, V] float32; row j = log p(· | the parent's tokens before optimized
            position j) (zeros = uniform for j = 0 when P = 0).
        values / ce_terms: [M, n + Q] / [M, n], as in :class:`EvalOut`.
        kv: per layer (keys, values) [M, T, n_kv_heads, d_head] (keys after rotary for the lean
            forward and the bridge, before it for transformer_lens's HookedTransformer); None on
            the plain path.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    ce_terms: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None


def banned_ids(subject: Subject, banned_tokens: list[str]) -> set[int]:
    """Token ids that may never enter a prompt: special tokens, ids outside the tokenizer, and the
    ban-list (a string matches an id whose vocabulary string or decoded text equals it).

    Raises:
        ConfigError: a ban-list string matches no token.
    """
    tok = subject.tokenizer
    V = subject.vocab_size
    out = subject.unusable_ids()
    if banned_tokens:
        vocab = tok.convert_ids_to_tokens(list(range(min(len(tok), V))))
        decoded = [tok.decode([i]) for i in range(min(len(tok), V))]
        for s in banned_tokens:
            hits = {i for i, (v, d) in enumerate(zip(vocab, decoded)) if v == s or d == s}
            if not hits:
                raise ConfigError(f"dream.banned_tokens: {s!r} is no token of this tokenizer; give a vocabulary string (e.g. {vocab[300]!r}) or a decoded token text")
            out |= hits
    return out


def merge_states(old: ParentState, new: ParentState, rows: torch.Tensor) -> ParentState:
    """``old`` with slots ``rows`` replaced by ``new``'s rows (same order)."""

    def put(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        a[rows] = b
        return a

    kv = None
    if old.kv is not None and new.kv is not None:
        kv = [(put(k0, k1), put(v0, v1)) for (k0, v0), (k1, v1) in zip(old.kv, new.kv)]
    return ParentState(tokens=put(old.tokens, new.tokens), logprobs=put(old.logprobs, new.logprobs),
                       values=put(old.values, new.values), ce_terms=put(old.ce_terms, new.ce_terms), kv=kv)


def log_lambdas(lmin: float, lmax: float, m: int, device: torch.device) -> torch.Tensor:
    """λ_i log-spaced from ``lmin`` to ``lmax`` (paper §3: log λ_i uniform on [log 0.1, log 10])."""
    if m == 1:
        return torch.tensor([lmin], device=device)
    return torch.logspace(math.log10(lmin), math.log10(lmax), m, device=device)
