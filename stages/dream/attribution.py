"""Causal token attribution of a prompt (Thompson et al. 2024, Fig. 1).

For every optimized position, the same top-k gradient operation as EPO (gradient of f w.r.t.
the one-hot prompt; banned/special tokens and the current token excluded) proposes k = 32
replacement tokens; each substitution is evaluated. The colour in Fig. 1 is the drop from the
worst substitution (f − min), the bar height the drop from the best alternative (f − max).
"""

from __future__ import annotations

import torch

from reverie.stages.dream.evaluator import PromptEvaluator
from reverie.stages.dream.result import PositionAttribution, Replacement


@torch.no_grad()
def _substitutions(opt: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    n, k = cand.shape
    subs = opt.expand(n * k, n).clone()                                   # [n*k, n]
    rows = torch.arange(n * k, device=opt.device)
    subs[rows, rows // k] = cand.reshape(-1)
    return subs


def token_attribution(ev: PromptEvaluator, token_ids: list[int], topk: int = 32) -> list[PositionAttribution]:
    """Attribution of each optimized position of one prompt.

    Args:
        ev: the :class:`PromptEvaluator` of the dream (same objective, template and ban-list).
        token_ids: the n optimized token ids.
        topk: substitutions per position (capped at the allowed vocabulary minus one).
    Returns:
        n :class:`PositionAttribution`, activations in the objective's units; replacements
        sorted by activation, descending.
    """
    opt = torch.tensor([token_ids], dtype=torch.long, device=ev.device)
    n = opt.shape[1]
    grad, _, _ = ev.gradients(opt, torch.zeros(1, device=ev.device))      # ∇f (λ = 0)
    allowed = ev.allowed[None, :].expand(n, -1).clone()
    allowed[torch.arange(n, device=ev.device), opt[0]] = False             # alternatives only
    k = max(1, min(topk, int(allowed.sum(-1).min())))
    cand = grad[0].masked_fill(~allowed, -torch.inf).topk(k, dim=-1).indices   # [n, k]
    base = float(ev.evaluate(opt).act[0])
    acts = ev.evaluate(_substitutions(opt, cand)).act.view(n, k)
    shown = ev.subject.decode_tokens      # display pieces (spaces kept, control characters escaped)
    out = []
    for j in range(n):
        order = torch.argsort(acts[j], descending=True).tolist()
        ids = cand[j].tolist()
        vals = acts[j].tolist()
        out.append(PositionAttribution(
            position=j, token_id=int(token_ids[j]), token=shown([int(token_ids[j])])[0],
            drop_worst=base - float(acts[j].min()), drop_best=base - float(acts[j].max()),
            replacements=[Replacement(token_id=int(ids[i]), token=shown([int(ids[i])])[0], activation=float(vals[i])) for i in order],
        ))
    return out
