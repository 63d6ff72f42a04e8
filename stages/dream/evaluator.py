"""The model side of EPO: one forward pass gives both the objective f(t) (a hook on the SAE's hook
point) and the logits for the self-cross-entropy (Thompson et al. 2024, eq. 1).

Prompt layout (positions of the full sequence, length T = P + n + Q)::

    [BOS] [fixed prefix]  |  t_0 … t_{n-1} (optimized)  |  [fixed suffix]
    ------- P tokens ------    ------- n tokens -------     -- Q tokens --

CE = mean over the optimized tokens of −log p(t_j | everything before it), in nats/token; BOS,
prefix and suffix are context only, never scored (t_0 is unscored when P = 0). The objective is
read on the hook activations of positions P … T−1 (``reduce='last'`` reads position T−1).

Two evaluation paths give the same numbers (within float error, tested ≤ 1e-4):

* plain: the full sequence through the model;
* cached (``prefix_cache``): the fixed prefix's keys/values are computed once; a child is run
  only from its first edited position on, attending to its parent's cached keys/values
  (transformer_lens ``TransformerLensKeyValueCache``), with the parent's CE terms and per-token
  objective values reused for the unchanged positions. Children are grouped by first edited
  position so every group is one batched forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import EPOConfig
from pipeline.errors import ConfigError
from sae_targets.loading import Subject
from sae_targets.objectives import Objective

_ELEMENT_BUDGET = 1 << 27   # logits elements per forward pass (512 MiB fp32) before OOM adaptation


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
        kv: per layer (keys, values) [M, T, n_kv_heads, d_head] (pre-rotary, as transformer_lens
            caches them); None on the plain path.
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
    out = set(subject.special_ids())
    out.update(range(min(len(tok), V), V))
    if banned_tokens:
        vocab = tok.convert_ids_to_tokens(list(range(min(len(tok), V))))
        decoded = [tok.decode([i]) for i in range(min(len(tok), V))]
        for s in banned_tokens:
            hits = {i for i, (v, d) in enumerate(zip(vocab, decoded)) if v == s or d == s}
            if not hits:
                raise ConfigError(f"dream.banned_tokens: {s!r} is no token of this tokenizer; give a vocabulary string (e.g. {vocab[300]!r}) or a decoded token text")
            out |= hits
    return out


class PromptEvaluator:
    """Evaluates f(t) and CE(t) for batches of optimized-token prompts on the model's device.

    Args:
        subject: the loaded model + SAE.
        objective: f, a callable on the hook activations (``Objective``).
        cfg: EPO settings used here: prefix, suffix, init_text / n_tokens, banned_tokens,
            prefix_cache, kv_groups, batch_size.

    Raises:
        ConfigError: the initial text contains banned/special tokens or is empty.
    """

    def __init__(self, subject: Subject, objective: Objective, cfg: EPOConfig):
        self.subject, self.objective, self.cfg = subject, objective, cfg
        self.model = subject.model
        self.device = subject.device
        self.V = subject.vocab_size
        self.prefix_ids = subject.with_bos(subject.encode(cfg.prefix) if cfg.prefix else [])
        self.suffix_ids = subject.encode(cfg.suffix) if cfg.suffix else []
        self.banned = banned_ids(subject, cfg.banned_tokens)
        allowed = torch.ones(self.V, dtype=torch.bool)
        allowed[sorted(self.banned)] = False
        self.allowed = allowed.to(self.device)
        self.allowed_ids = torch.nonzero(allowed).squeeze(1).to(self.device)
        if self.allowed_ids.numel() == 0:
            raise ConfigError("every token is banned; shorten dream.banned_tokens")
        self.init_ids: list[int] | None = None
        if cfg.init_text:
            ids = subject.encode(cfg.init_text)
            bad = [subject.tokenizer.decode([i]) for i in ids if i in self.banned]
            if not ids or bad:
                raise ConfigError(f"dream.init_text {'is empty' if not ids else f'contains banned or special tokens {bad}'}; change the text or the ban-list")
            self.init_ids = ids
        self.n = len(self.init_ids) if self.init_ids else cfg.n_tokens
        self.P, self.Q = len(self.prefix_ids), len(self.suffix_ids)
        self.T = self.P + self.n + self.Q
        self.prefix_cache = bool(cfg.prefix_cache)
        self.kv_groups = getattr(cfg, "kv_groups", None)
        self.batch_size = cfg.batch_size
        self._auto_bs: int | None = None
        scored = torch.ones(self.n, dtype=torch.float32)
        if self.P == 0:
            scored[0] = 0.0
        self.scored = scored.to(self.device)
        self.n_scored = max(int(scored.sum()), 1)
        self._prefix_t = torch.tensor(self.prefix_ids, dtype=torch.long, device=self.device)
        self._suffix_t = torch.tensor(self.suffix_ids, dtype=torch.long, device=self.device)
        mcfg = self.model.cfg
        self.last_resid_hook = f"blocks.{mcfg.n_layers - 1}.hook_resid_post"
        self.kv_heads = mcfg.n_key_value_heads or mcfg.n_heads
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._prefix_logprobs = torch.zeros(self.V, device=self.device)   # uniform when P = 0
        if self.P > 0:
            self._init_prefix()

    # ------------------------------------------------------------------ basics
    def full(self, opt: torch.Tensor) -> torch.Tensor:
        """[B, n] optimized tokens → [B, T] full sequences (BOS + prefix + opt + suffix)."""
        B = opt.shape[0]
        return torch.cat([self._prefix_t.expand(B, -1), opt.to(self.device), self._suffix_t.expand(B, -1)], dim=1)

    def random_prompts(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """[k, n] int64 prompts of uniformly random allowed tokens (seeded)."""
        idx = torch.randint(self.allowed_ids.numel(), (k, self.n), generator=generator, device=generator.device)
        return self.allowed_ids[idx.to(self.device)]

    def _logits(self, resid: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m.cfg.normalization_type is not None:
            resid = m.ln_final(resid)
        logits = m.unembed(resid)
        cap = getattr(m.cfg, "output_logits_soft_cap", -1.0) or -1.0
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits.float()

    def _init_prefix(self) -> None:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, 1)
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.model.run_with_hooks(
                self._prefix_t[None], return_type=None, past_kv_cache=cache,
                attention_mask=torch.ones(1, self.P, dtype=torch.long, device=self.device),
                fwd_hooks=[(self.last_resid_hook, lambda x, hook: store.__setitem__("r", x))],
            )
            self._prefix_logprobs = torch.log_softmax(self._logits(store["r"][0, -1]), dim=-1)
        self._prefix_kv = [(e.past_keys, e.past_values) for e in cache.entries]

    # ------------------------------------------------------------------ core forward
    def _run(self, tail: torch.Tensor, start: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None,
             record_kv: bool = False, onehot: torch.Tensor | None = None):
        """Forward ``tail`` = full positions [start, T) given keys/values of positions < start.

        Returns ``(acts [B, L, d_in], final_resid [B, L, d_model], kv or None)``.
        """
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

        B, L = tail.shape
        store: dict[str, torch.Tensor] = {}
        hooks: list[tuple[str, Callable]] = [
            (self.subject.hook_name, lambda x, hook: store.__setitem__("act", x)),
            (self.last_resid_hook, lambda x, hook: store.__setitem__("resid", x)),
        ]
        if onehot is not None:
            j0, n = self.P - start, self.n
            W_E = self.model.W_E

            def swap_embed(e, hook):
                sub = onehot.to(W_E.dtype) @ W_E
                # forward value unchanged; gradient flows to the one-hot (paper §2 step 2a)
                return torch.cat([e[:, :j0], e[:, j0:j0 + n] + (sub - sub.detach()), e[:, j0 + n:]], dim=1)

            hooks.append(("hook_embed", swap_embed))
        kwargs = {}
        cache = None
        if past is not None or record_kv:
            if past is not None:
                entries = [Entry(past_keys=k, past_values=v) for k, v in past]
            else:
                entries = [Entry.init_cache_entry(self.model.cfg, self.device, B) for _ in range(self.model.cfg.n_layers)]
            cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=torch.ones(B, start, dtype=torch.int, device=self.device))
            if not record_kv:
                cache.freeze()
            kwargs = {"past_kv_cache": cache, "attention_mask": torch.ones(B, L, dtype=torch.long, device=self.device)}
        self.model.run_with_hooks(tail, return_type=None, fwd_hooks=hooks, **kwargs)
        kv = [(e.past_keys, e.past_values) for e in cache.entries] if record_kv else None
        return store["act"], store["resid"], kv

    def _tail_outputs(self, opt: torch.Tensor, start: int, acts: torch.Tensor, resid: torch.Tensor,
                      onehot: torch.Tensor | None = None, want_logprobs: bool = False):
        """Per-token values for positions ≥ max(start, P) and CE terms / log-probs of the optimized
        tokens whose predicting position (P + j − 1) lies in the tail."""
        P, n = self.P, self.n
        off = max(P - start, 0)
        values = self.objective.per_token(acts[:, off:]).float()             # positions max(start,P)..T-1
        j_lo = max(start - P + 1, 0)
        ce = logprobs = None
        if j_lo < n:
            i0 = P + j_lo - 1 - start
            logits = self._logits(resid[:, i0:i0 + n - j_lo])
            lp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            if onehot is not None:
                ce = -(onehot[:, j_lo:] * lp).sum(-1)
            else:
                ce = -lp.gather(-1, opt[:, j_lo:, None]).squeeze(-1)
            logprobs = lp if want_logprobs else None
        return values, ce, logprobs, j_lo

    def _finish(self, values: torch.Tensor, ce_terms: torch.Tensor) -> EvalOut:
        ce_terms = ce_terms * self.scored
        act = self.objective.reduce_tokens(values, slice(0, self.n)).float()
        return EvalOut(act=act, ce=ce_terms.sum(-1) / self.n_scored, values=values, ce_terms=ce_terms)

    # ------------------------------------------------------------------ batching
    def _batched(self, n_items: int, width: int, fn: Callable[[int, int], EvalOut]) -> EvalOut:
        """Run ``fn(lo, hi)`` over chunks; the chunk size adapts to memory (halved on OOM)."""
        if n_items == 0:
            z = torch.zeros(0, device=self.device)
            return EvalOut(z, z, torch.zeros(0, self.n + self.Q, device=self.device), torch.zeros(0, self.n, device=self.device))
        bs = self.batch_size or self._auto_bs or max(1, _ELEMENT_BUDGET // max(1, width * self.V))
        while True:
            try:
                return EvalOut.cat([fn(lo, min(lo + bs, n_items)) for lo in range(0, n_items, bs)])
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                self._auto_bs = bs
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ public evaluation
    @torch.no_grad()
    def evaluate(self, opt: torch.Tensor) -> EvalOut:
        """Plain path: f and CE of [B, n] prompts, full sequences through the model."""
        opt = opt.to(self.device)

        def run(lo: int, hi: int) -> EvalOut:
            o = opt[lo:hi]
            acts, resid, _ = self._run(self.full(o), 0, None)
            values, ce, _, j_lo = self._tail_outputs(o, 0, acts, resid)
            ce_terms = torch.zeros(hi - lo, self.n, device=self.device)
            if ce is not None:
                ce_terms[:, j_lo:] = ce
            return self._finish(values, ce_terms)

        return self._batched(opt.shape[0], self.T, run)

    @torch.no_grad()
    def evaluate_children(self, children: torch.Tensor, slot: torch.Tensor, first: np.ndarray, parents: ParentState) -> EvalOut:
        """f and CE of children; cached path when ``prefix_cache`` (else :meth:`evaluate`).

        Args:
            children: [C, n] int64 prompts.
            slot: [C] int64 parent slot of each child (device).
            first: [C] host ints, first optimized position where the child may differ from its
                parent (positions before it must equal the parent's).
            parents: the population's :class:`ParentState`.
        Returns:
            :class:`EvalOut` in the children's order.
        """
        if not self.prefix_cache or parents.kv is None:
            return self.evaluate(children)
        C = children.shape[0]
        first = np.minimum(np.asarray(first), self.n - 1)
        order = np.argsort(first, kind="stable")
        groups = self._groups(first[order])
        outs: list[EvalOut] = []
        for lo, hi in groups:
            idx_np = order[lo:hi]
            p = int(first[idx_np].min())
            idx = torch.as_tensor(idx_np, device=self.device)
            outs.append(self._eval_group(children[idx], slot[idx], p, parents))
        res = EvalOut.cat(outs)
        inv = torch.empty(C, dtype=torch.long, device=self.device)
        inv[torch.as_tensor(order, device=self.device)] = torch.arange(C, device=self.device)
        return res.index(inv)

    def _groups(self, sorted_first: np.ndarray) -> list[tuple[int, int]]:
        C = len(sorted_first)
        if self.kv_groups:
            bounds = sorted(set(int(round(i * C / self.kv_groups)) for i in range(self.kv_groups + 1)))
            return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        cuts = np.flatnonzero(np.diff(sorted_first)) + 1
        bounds = [0, *cuts.tolist(), C]
        return list(zip(bounds[:-1], bounds[1:]))

    def _eval_group(self, kids: torch.Tensor, slot: torch.Tensor, p: int, parents: ParentState) -> EvalOut:
        start = self.P + p
        full = self.full(kids)

        def run(lo: int, hi: int) -> EvalOut:
            o, s = kids[lo:hi], slot[lo:hi]
            past = [(k[s, :start], v[s, :start]) for k, v in parents.kv] if start > 0 else None
            acts, resid, _ = self._run(full[lo:hi, start:], start, past)
            vals_tail, ce_tail, _, j_lo = self._tail_outputs(o, start, acts, resid)
            values = torch.cat([parents.values[s, :p], vals_tail], dim=1)
            ce_terms = torch.empty(hi - lo, self.n, device=self.device)
            ce_terms[:, :p] = parents.ce_terms[s, :p]
            ce_terms[:, p] = -parents.logprobs[s, p].gather(-1, o[:, p:p + 1]).squeeze(-1)
            if ce_tail is not None:
                ce_terms[:, j_lo:] = ce_tail
            return self._finish(values, ce_terms)

        return self._batched(kids.shape[0], self.T - start, run)

    def gradients(self, opt: torch.Tensor, lambdas: torch.Tensor) -> tuple[torch.Tensor, EvalOut, ParentState]:
        """Token gradients of L_λ(t) = f(t) − λ·CE(t) w.r.t. the one-hot prompt (paper §2, step 2a).

        Args:
            opt: [S, n] int64 prompts; lambdas: [S] float λ of each row.
        Returns:
            ``(grad [S, n, V] float32, EvalOut, ParentState of these rows)``; keys/values are
            recorded (detached) when ``prefix_cache``.
        """
        opt = opt.to(self.device)
        S, n = opt.shape
        onehot = torch.nn.functional.one_hot(opt, self.V).float().requires_grad_(True)
        cached = self.prefix_cache
        start = self.P if cached else 0
        with torch.enable_grad():
            if cached:
                past = [(k.expand(S, -1, -1, -1), v.expand(S, -1, -1, -1)) for k, v in self._prefix_kv] if self._prefix_kv else None
                acts, resid, kv = self._run(self.full(opt)[:, start:], start, past, record_kv=True, onehot=onehot)
            else:
                acts, resid, kv = self._run(self.full(opt), 0, None, onehot=onehot)
            values, ce_tail, lp_tail, j_lo = self._tail_outputs(opt, start, acts, resid, onehot=onehot, want_logprobs=True)
            parts, lps = [], []
            if j_lo > 0:   # j = 0 predicted by the (constant) prefix: linear in the one-hot
                parts.append(-(onehot[:, 0] * self._prefix_logprobs).sum(-1, keepdim=True))
                lps.append(self._prefix_logprobs.expand(S, 1, -1))
            if ce_tail is not None:
                parts.append(ce_tail)
                lps.append(lp_tail)
            ce_terms = torch.cat(parts, dim=1) * self.scored
            act = self.objective.reduce_tokens(values, slice(0, n)).float()
            ce = ce_terms.sum(-1) / self.n_scored
            loss = (act - lambdas.to(act.dtype) * ce).sum()
            (grad,) = torch.autograd.grad(loss, onehot)
        out = EvalOut(act.detach(), ce.detach(), values.detach(), ce_terms.detach())
        logprobs = torch.cat(lps, dim=1).detach()
        state = ParentState(tokens=opt, logprobs=logprobs, values=out.values, ce_terms=out.ce_terms,
                            kv=[(k.detach(), v.detach()) for k, v in kv] if kv is not None else None)
        return grad, out, state

    @torch.no_grad()
    def details(self, opt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token objective over the optimized positions [B, n] and each latent's value at the
        read position [B, L] (last token, or the argmax optimized position for reduce='max')."""
        opt = opt.to(self.device)
        acts, _, _ = self._run(self.full(opt), 0, None)
        lat = self.objective.latent_values(acts[:, self.P:]).float()          # [B, n+Q, L]
        per = self.objective.per_token(acts[:, self.P:]).float()              # [B, n+Q]
        if self.objective.reduce == "max":
            pos = per[:, : self.n].argmax(-1)
        else:
            pos = torch.full((opt.shape[0],), per.shape[1] - 1, device=self.device, dtype=torch.long)
        return per[:, : self.n], lat[torch.arange(opt.shape[0], device=self.device), pos]


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
