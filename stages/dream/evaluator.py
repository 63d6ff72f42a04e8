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
* cached (``prefix_cache``): the fixed prefix's keys/values are computed once; children are
  split into ``kv_buckets`` fixed ranges of their first edited position p (bucket b holds
  p ∈ [⌈b·n/K⌉, ⌈(b+1)·n/K⌉)); each bucket is one batched forward (chunked for memory) that
  starts at the bucket's first position and attends to the parents' cached keys/values
  (the lean forward's cache, else the backend's: transformer_lens ``TransformerLensKeyValueCache``
  for ``model.backend = "hooked"``, HF's ``DynamicCache`` for ``"bridge"``, see
  :mod:`sae_targets.backend`; a bridge whose cache fails its check runs plain) for the positions before it. The
  parent's CE terms before p and its log-probs at p are reused. Bucket boundaries depend only
  on (n, K), never on the batch, so a child's numbers do not depend on which other children
  (or other targets) share its batch.

Either way only the logits that score a new token are computed: the rows (child, position)
that predict optimized tokens after the child's first edit are gathered into one ragged
[R, d_model] matrix, unembedded once, and CE = logsumexp(logits) − logit[token] (no
[B, n, V] log-softmax). Several objectives (targets) can share one batch: row b reads
objective ``group[b]`` from the same hook activations.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from reverie.pipeline.config import EPOConfig
from reverie.pipeline.errors import ConfigError
from reverie.sae_targets.loading import Subject
from reverie.sae_targets.objectives import Objective
from reverie.stages.dream.eval_state import EvalOut, ParentState, banned_ids, group_runs
from reverie.stages.dream.eval_state import log_lambdas, merge_states  # noqa: F401 - re-exported (stages.dream.epo imports them from here)
from reverie.stages.dream.gradients import TokenGradients

_ELEMENT_BUDGET = 1 << 27   # logits elements per forward pass (512 MiB fp32) before OOM adaptation


class PromptEvaluator(TokenGradients):
    """Evaluates f(t) and CE(t) for batches of optimized-token prompts on the model's device.

    Args:
        subject: the loaded model + SAE.
        objectives: one ``Objective`` or a sequence of them (one per target of a batched run;
            row b of a batch reads ``objectives[group[b]]``).
        cfg: EPO settings used here: prefix, suffix, init_text / n_tokens, banned_tokens,
            prefix_cache, kv_buckets, batch_size.
        scales: [G] positive divisors of each objective in the gradient's L_λ (objective scale,
            e.g. σ of f over random prompts); None = 1. Returned values stay unscaled.

    Raises:
        ConfigError: the initial text contains banned/special tokens or is empty.
    """

    def __init__(self, subject: Subject, objectives: Objective | Sequence[Objective], cfg: EPOConfig,
                 scales: Sequence[float] | None = None):
        self.subject, self.cfg = subject, cfg
        self.objectives = [objectives] if isinstance(objectives, Objective) else list(objectives)
        if not self.objectives:
            raise ConfigError("PromptEvaluator needs at least one objective")
        self.objective = self.objectives[0]
        self.model = subject.model
        self.device = subject.device
        self.V = subject.vocab_size
        self.scales = torch.tensor(list(scales) if scales is not None else [1.0] * len(self.objectives), dtype=torch.float32, device=self.device)
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
        self.kv_buckets = max(1, min(int(getattr(cfg, "kv_buckets", 1) or 1), self.n))
        self.batch_size = cfg.batch_size
        self._auto_bs: int | None = None
        scored = torch.ones(self.n, dtype=torch.float32)
        if self.P == 0:
            scored[0] = 0.0
        self.scored = scored.to(self.device)
        self.n_scored = max(int(scored.sum()), 1)
        self._prefix_t = torch.tensor(self.prefix_ids, dtype=torch.long, device=self.device)
        self._suffix_t = torch.tensor(self.suffix_ids, dtype=torch.long, device=self.device)
        from reverie.sae_targets.backend import tail_forward
        from reverie.stages.dream.lean import lean_forward

        self.lean = None
        self.search_dtype = torch.bfloat16 if getattr(cfg, "search_dtype", "float32") == "bfloat16" else torch.float32
        if getattr(cfg, "lean_forward", True):
            self.lean = lean_forward(self.model, subject.hook_name, dtype=self.search_dtype if self.search_dtype != torch.float32 else None)
        self.tail = None
        if self.lean is None:
            self.search_dtype = torch.float32      # bf16 search needs the lean forward
            self.tail = tail_forward(self.model, subject.hook_name, self.device)   # the backend's own forward
            self.prefix_cache = self.prefix_cache and self.tail.caches
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

    def _groups(self, group: np.ndarray | None, B: int) -> np.ndarray:
        if group is None:
            if len(self.objectives) > 1:
                raise ValueError("several objectives: pass the group (objective index) of every row")
            return np.zeros(B, dtype=np.int64)
        return np.asarray(group, dtype=np.int64)

    def _logits(self, resid: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m.cfg.normalization_type is not None:
            resid = m.ln_final(resid)
        logits = self.lean.unembed(resid) if self.lean is not None else m.unembed(resid)
        cap = getattr(m.cfg, "output_logits_soft_cap", -1.0) or -1.0
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits.float()

    def _init_prefix(self) -> None:
        if self.tail is not None and not self.tail.caches:
            return                                   # no cache on this backend: every evaluation starts at 0
        with torch.no_grad():
            _, resid, kv = self._run(self._prefix_t[None], 0, None, record_kv=True)
            self._prefix_logprobs = torch.log_softmax(self._logits(resid[0, -1]), dim=-1)
        self._prefix_kv = kv

    # ------------------------------------------------------------------ core forward
    def _run(self, tail: torch.Tensor, start: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None,
             record_kv: bool = False, onehot: torch.Tensor | None = None):
        """Forward ``tail`` = full positions [start, T) given keys/values of positions < start
        (:class:`~stages.dream.lean.LeanForward` when it covers the model, else the backend's own
        forward with its key/value cache, :func:`sae_targets.backend.tail_forward`; one evaluator
        always uses one of them, whose cache layouts differ).

        Returns ``(acts [B, L, d_in], final_resid [B, L, d_model], kv or None)``.
        """
        embed_hook = None
        if onehot is not None:
            j0, n, W_E = self.P - start, self.n, self.model.W_E

            def embed_hook(e):
                sub = onehot.to(W_E.dtype) @ W_E
                # forward value unchanged; gradient flows to the one-hot (paper §2 step 2a)
                return torch.cat([e[:, :j0], e[:, j0:j0 + n] + (sub - sub.detach()), e[:, j0 + n:]], dim=1)

        forward = self.lean if self.lean is not None else self.tail
        return forward.run(tail, start, past, record_kv, embed_hook)

    def per_token(self, acts: torch.Tensor, group: np.ndarray) -> torch.Tensor:
        """Objective of each row's group at every position: [B, L, d_in] → [B, L] float32."""
        parts = [self.objectives[g].per_token(acts[lo:hi]).float() for g, lo, hi in group_runs(group)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def reduce(self, values: torch.Tensor, group: np.ndarray) -> torch.Tensor:
        """[B, n + Q] per-token values → [B] f(t) (each row's objective's reduce rule)."""
        parts = [self.objectives[g].reduce_tokens(values[lo:hi], slice(0, self.n)).float() for g, lo, hi in group_runs(group)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _ragged_ce(self, resid: torch.Tensor, opt: torch.Tensor, row0: int, need: np.ndarray) -> torch.Tensor:
        """CE terms from the rows of ``resid`` that predict optimized tokens.

        Args:
            resid: [B, L, d_model] final residual of positions [start, start + L).
            opt: [B, n] optimized tokens.
            row0: optimized index j predicted by resid row i is j = i + row0 (row0 = start − P + 1).
            need: [B, n] host bool, which j to compute (only j whose predicting row is in
                ``resid``); on the host so that gathering the rows needs no device sync.
        Returns:
            [B, n] float32: −log p(t_j | t_<j) where ``need``, else 0.
        """
        B, n = opt.shape
        out = torch.zeros(B, n, device=self.device)
        b_np, j_np = np.nonzero(need)
        if b_np.size == 0:
            return out
        b_idx, j_idx = torch.as_tensor(b_np, device=self.device), torch.as_tensor(j_np, device=self.device)
        logits = self._logits(resid[b_idx, j_idx - row0])                      # [R, V]
        lse = torch.logsumexp(logits, dim=-1)
        tgt = logits.gather(-1, opt[b_idx, j_idx][:, None]).squeeze(-1)
        out[b_idx, j_idx] = lse - tgt
        return out

    def _finish(self, values: torch.Tensor, ce_terms: torch.Tensor, group: np.ndarray) -> EvalOut:
        ce_terms = ce_terms * self.scored
        return EvalOut(act=self.reduce(values, group), ce=ce_terms.sum(-1) / self.n_scored, values=values, ce_terms=ce_terms)

    # ------------------------------------------------------------------ batching
    def _batched(self, n_items: int, width: int, fn: Callable[[int, int], EvalOut]) -> EvalOut:
        """Run ``fn(lo, hi)`` over chunks; the chunk size adapts to memory (halved on OOM)."""
        if n_items == 0:
            z = torch.zeros(0, device=self.device)
            return EvalOut(z, z, torch.zeros(0, self.n + self.Q, device=self.device), torch.zeros(0, self.n, device=self.device))
        d = int(self.model.cfg.d_model) * int(self.model.cfg.n_layers) * 8
        bs = self.batch_size or self._auto_bs or max(1, _ELEMENT_BUDGET // max(1, width * max(self.V // 2, d)))
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
    def evaluate(self, opt: torch.Tensor, group: np.ndarray | None = None) -> EvalOut:
        """Plain path: f and CE of [B, n] prompts, full sequences through the model.

        Args:
            opt: [B, n] int64 optimized tokens.
            group: [B] host ints, objective index of each row (None with one objective).
        Returns:
            :class:`EvalOut` (f in the objective's own units, CE in nats/token).
        """
        opt = opt.to(self.device)
        group = self._groups(group, opt.shape[0])
        start = self.P if (self.prefix_cache and self._prefix_kv is not None) else 0
        need = self._predictable(start).copy()
        need[0, : max(start - self.P + 1, 0)] = False                      # j predicted inside the cached prefix

        def run(lo: int, hi: int) -> EvalOut:
            o, g = opt[lo:hi], group[lo:hi]
            past = [(k.expand(hi - lo, -1, -1, -1), v.expand(hi - lo, -1, -1, -1)) for k, v in self._prefix_kv] if start > 0 else None
            acts, resid, _ = self._run(self.full(o)[:, start:], start, past)
            values = self.per_token(acts[:, self.P - start:], g)
            ce_terms = self._ragged_ce(resid, o, start - self.P + 1, np.broadcast_to(need, (hi - lo, self.n)))
            if start > 0 and self.P > 0:   # j = 0 predicted by the constant prefix
                ce_terms[:, 0] = -self._prefix_logprobs[o[:, 0]]
            return self._finish(values, ce_terms, g)

        return self._batched(opt.shape[0], self.T - start, run)

    def _predictable(self, start: int) -> np.ndarray:
        """[1, n] host bool: optimized j whose predicting position P + j − 1 is ≥ ``start`` (in the run)."""
        return ((self.P + np.arange(self.n) - 1) >= start)[None, :]

    @torch.no_grad()
    def evaluate_children(self, children: torch.Tensor, slot: torch.Tensor, first: np.ndarray, parents: ParentState,
                          group: np.ndarray | None = None) -> EvalOut:
        """f and CE of children; cached path when ``prefix_cache`` (else :meth:`evaluate`).

        Args:
            children: [C, n] int64 prompts.
            slot: [C] int64 parent slot of each child (device).
            first: [C] host ints, first optimized position where the child may differ from its
                parent (positions before it must equal the parent's).
            parents: the population's :class:`ParentState`.
            group: [C] host ints, objective index of each child (None with one objective).
        Returns:
            :class:`EvalOut` in the children's order.
        """
        group = self._groups(group, children.shape[0])
        if not self.prefix_cache or parents.kv is None:
            return self.evaluate(children, group)
        C, n, K = children.shape[0], self.n, self.kv_buckets
        first = np.minimum(np.asarray(first), n - 1)
        bucket = (first * K) // n
        order = np.argsort(bucket, kind="stable")
        outs: list[EvalOut] = []
        for b in range(K):
            sel = order[bucket[order] == b]
            if sel.size == 0:
                continue
            p0 = -(-b * n // K)                                                # ⌈b·n/K⌉
            idx = torch.as_tensor(sel, device=self.device)
            outs.append(self._eval_bucket(children[idx], slot[idx], p0, first[sel], parents, group[sel]))
        res = EvalOut.cat(outs)
        inv = torch.empty(C, dtype=torch.long, device=self.device)
        inv[torch.as_tensor(order, device=self.device)] = torch.arange(C, device=self.device)
        return res.index(inv)

    def _eval_bucket(self, kids: torch.Tensor, slot: torch.Tensor, p0: int, first: np.ndarray, parents: ParentState,
                     group: np.ndarray) -> EvalOut:
        start = self.P + p0
        full = self.full(kids)
        j = torch.arange(self.n, device=self.device)
        first_dev = torch.as_tensor(first, device=self.device)
        pred = self._predictable(start)

        def run(lo: int, hi: int) -> EvalOut:
            o, s, f = kids[lo:hi], slot[lo:hi], first_dev[lo:hi]
            past = [(k[s, :start], v[s, :start]) for k, v in parents.kv] if start > 0 else None
            acts, resid, _ = self._run(full[lo:hi, start:], start, past)
            vals_tail = self.per_token(acts[:, max(self.P - start, 0):], group[lo:hi])
            values = torch.cat([parents.values[s, :p0], vals_tail], dim=1)
            need = (np.arange(self.n)[None, :] > first[lo:hi, None]) & pred
            ce_terms = self._ragged_ce(resid, o, start - self.P + 1, need)
            before = j[None, :] < f[:, None]
            ce_terms = torch.where(before, parents.ce_terms[s], ce_terms)
            at = parents.logprobs[s, f].gather(-1, o.gather(1, f[:, None])).squeeze(-1)   # t_p given the parent's (= child's) prefix
            ce_terms[torch.arange(hi - lo, device=self.device), f] = -at
            return self._finish(values, ce_terms, group[lo:hi])

        return self._batched(kids.shape[0], self.T - start, run)

    @torch.no_grad()
    def details(self, opt: torch.Tensor, group: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token objective over the optimized positions [B, n] and each latent's value at the
        read position [B, L] (last token, or the argmax optimized position for reduce='max');
        all rows must belong to one objective (the first row's group)."""
        opt = opt.to(self.device)
        group = self._groups(group, opt.shape[0])
        obj = self.objectives[int(group[0])] if len(group) else self.objective
        acts, _, _ = self._run(self.full(opt), 0, None)
        lat = obj.latent_values(acts[:, self.P:]).float()          # [B, n+Q, L]
        per = obj.per_token(acts[:, self.P:]).float()              # [B, n+Q]
        if obj.reduce == "max":
            pos = per[:, : self.n].argmax(-1)
        else:
            pos = torch.full((opt.shape[0],), per.shape[1] - 1, device=self.device, dtype=torch.long)
        return per[:, : self.n], lat[torch.arange(opt.shape[0], device=self.device), pos]
