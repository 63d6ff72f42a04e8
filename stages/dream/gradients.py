"""The gradient path of the dream evaluator (Thompson et al. 2024, §2 step 2a): token gradients of
L_λ(t) = f(t)/s − λ·CE(t) with respect to the one-hot prompt, from the same forward (plain or from the
cached prefix) as :class:`~stages.dream.evaluator.PromptEvaluator`'s evaluations.
"""

from __future__ import annotations

import numpy as np
import torch

from reverie.stages.dream.eval_state import EvalOut, ParentState


class TokenGradients:
    """:meth:`gradients` of :class:`~stages.dream.evaluator.PromptEvaluator` (mixed into it: uses its
    forward ``_run``, ``full``, ``per_token``, ``reduce``, ``_logits``, ``_groups`` and its prompt
    layout ``P``, ``n``, ``V``, ``scored``, ``n_scored``, ``scales``, ``prefix_cache``, ``_prefix_kv``,
    ``_prefix_logprobs``)."""

    def gradients(self, opt: torch.Tensor, lambdas: torch.Tensor, group: np.ndarray | None = None) -> tuple[torch.Tensor, EvalOut, ParentState]:
        """Token gradients of L_λ(t) = f(t)/s − λ·CE(t) w.r.t. the one-hot prompt (paper §2, step 2a;
        s = the row's objective scale, 1 by default).

        Args:
            opt: [S, n] int64 prompts; lambdas: [S] float λ of each row.
            group: [S] host ints, objective index of each row (None with one objective).
        Returns:
            ``(grad [S, n, V] float32, EvalOut, ParentState of these rows)``; f in EvalOut is
            unscaled; keys/values are recorded (detached) when ``prefix_cache``.
        """
        opt = opt.to(self.device)
        S, n = opt.shape
        group = self._groups(group, S)
        onehot = torch.nn.functional.one_hot(opt, self.V).float().requires_grad_(True)
        cached = self.prefix_cache
        start = self.P if cached else 0
        with torch.enable_grad():
            if cached:
                past = [(k.expand(S, -1, -1, -1), v.expand(S, -1, -1, -1)) for k, v in self._prefix_kv] if self._prefix_kv else None
                acts, resid, kv = self._run(self.full(opt)[:, start:], start, past, record_kv=True, onehot=onehot)
            else:
                acts, resid, kv = self._run(self.full(opt), 0, None, onehot=onehot)
            values = self.per_token(acts[:, self.P - start:], group)
            j_lo = max(start - self.P + 1, 0)          # first j predicted inside this run
            parts, lps = [], []
            if j_lo > 0:   # j = 0 predicted by the (constant) prefix: linear in the one-hot
                parts.append(-(onehot[:, 0] * self._prefix_logprobs).sum(-1, keepdim=True))
                lps.append(self._prefix_logprobs.expand(S, 1, -1))
            if j_lo < n:
                i0 = self.P + j_lo - 1 - start
                lp = torch.log_softmax(self._logits(resid[:, i0:i0 + n - j_lo]), dim=-1)
                parts.append(-(onehot[:, j_lo:] * lp).sum(-1))
                lps.append(lp)
            ce_terms = torch.cat(parts, dim=1) * self.scored
            act = self.reduce(values, group)
            ce = ce_terms.sum(-1) / self.n_scored
            scale = self.scales[torch.as_tensor(group, device=self.device)]
            loss = (act / scale - lambdas.to(act.dtype) * ce).sum()
            (grad,) = torch.autograd.grad(loss, onehot)
        out = EvalOut(act.detach(), ce.detach(), values.detach(), ce_terms.detach())
        logprobs = torch.cat(lps, dim=1).detach()
        state = ParentState(tokens=opt, logprobs=logprobs, values=out.values, ce_terms=out.ce_terms,
                            kv=[(k.detach(), v.detach()) for k, v in kv] if kv is not None else None)
        return grad, out, state
