"""EPO mutation and selection steps as batched tensor operations (Thompson et al. 2024 §2).

* :func:`topk_candidates` — step 2b: per position, the k tokens with the largest gradient of
  L_λ (banned and special tokens masked with −inf first, k capped at the allowed vocabulary).
* :func:`propose_children` — step 2c: r children per member, each replacing one uniformly chosen
  position with a uniformly chosen top-k token; plus the follow-up post's optional
  augmentations (logit proposals at temperature U(0, 2), no top-k mask, extra resampled
  positions, swaps). Which positions change is drawn on the host (a few hundred integers,
  no device round trip) so children can be grouped by first edited position; token choices
  are drawn on the model's device.
* :func:`select_with_replacement` — step 3: each λ_i keeps the argmax of L_λi over parents ∪
  children, independently (a candidate may fill several slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reverie.pipeline.config import EPOConfig


def topk_candidates(grad: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k tokens per position by gradient of L_λ.

    Args:
        grad: [S, n, V] float gradient of L_λ w.r.t. the one-hot prompt.
        allowed: [V] bool, False for banned/special tokens.
        k: requested k; capped at the number of allowed tokens.
    Returns:
        int64 [S, n, k'] token ids, all allowed.
    """
    k = min(k, int(allowed.sum()))
    masked = grad.masked_fill(~allowed, -torch.inf)
    return masked.topk(k, dim=-1).indices


@dataclass
class Children:
    """A batch of proposed children.

    Attributes:
        tokens: [C, n] int64 (device).
        slot: [C] int64 parent slot (device).
        slot_host / first: [C] numpy ints: parent slot and first edited position (host).
    """

    tokens: torch.Tensor
    slot: torch.Tensor
    slot_host: np.ndarray
    first: np.ndarray

    def subset(self, keep: np.ndarray) -> "Children":
        idx = torch.as_tensor(np.flatnonzero(keep), device=self.tokens.device)
        return Children(self.tokens[idx], self.slot[idx], self.slot_host[keep], self.first[keep])


def propose_children(parents: torch.Tensor, topk: torch.Tensor, logprobs: torch.Tensor | None, allowed: torch.Tensor,
                     cfg: EPOConfig, host_gen: torch.Generator, dev_gen: torch.Generator) -> Children:
    """Generate ``cfg.children`` children per population member (paper §2 step 2c + augmentations).

    Args:
        parents: [M, n] int64 population (device).
        topk: [M, n, k] int64 top-k gradient tokens of each member under its own λ.
        logprobs: [M, n, V] float32 parent next-token log-probs (row j predicts position j);
            needed when ``cfg.p_logit_proposals > 0``.
        allowed: [V] bool allowed-token mask.
        cfg: children (r), p_logit_proposals, p_no_topk_mask, p_extra_resample, p_swap.
        host_gen: CPU generator for positions and path choices; dev_gen: device generator for tokens.
    Returns:
        :class:`Children`; every token of every child is allowed (parents' tokens are).
    """
    dev = parents.device
    M, n = parents.shape
    r, k = cfg.children, topk.shape[-1]
    C = M * r
    slot_host = np.repeat(np.arange(M), r)
    # ---- host: which positions change and by which path
    pos = torch.randint(n, (C,), generator=host_gen)
    edit = torch.zeros(C, n, dtype=torch.bool)
    edit[torch.arange(C), pos] = True
    if cfg.p_extra_resample > 0:
        edit |= torch.rand(C, n, generator=host_gen) < cfg.p_extra_resample
    logit_child = torch.rand(C, generator=host_gen) < cfg.p_logit_proposals if cfg.p_logit_proposals > 0 else torch.zeros(C, dtype=torch.bool)
    no_mask = logit_child & (torch.rand(C, generator=host_gen) < cfg.p_no_topk_mask)
    swap = (torch.rand(C, generator=host_gen) < cfg.p_swap) if (cfg.p_swap > 0 and n > 1) else torch.zeros(C, dtype=torch.bool)
    sa = torch.randint(n, (C,), generator=host_gen)
    sb = (sa + torch.randint(1, max(n, 2), (C,), generator=host_gen)) % n
    first = torch.where(edit, torch.arange(n).expand(C, n), torch.full((C, n), n)).min(1).values
    first = torch.where(swap, torch.minimum(first, torch.minimum(sa, sb)), first)
    # ---- device: token choices
    slot = torch.as_tensor(slot_host, device=dev)
    pick = torch.randint(k, (C, n), generator=dev_gen, device=dev)
    chosen = topk[slot[:, None], torch.arange(n, device=dev)[None, :], pick]          # [C, n]
    rows_c, rows_j = torch.nonzero(edit & logit_child[:, None], as_tuple=True)      # host
    if rows_c.numel() > 0:
        if logprobs is None:
            raise ValueError("logit proposals need the parents' log-probs")
        rc, rj = rows_c.to(dev), rows_j.to(dev)
        lp = logprobs[slot[rc], rj]                                                  # [R, V]
        keep = allowed[None, :].expand_as(lp).clone()
        in_topk = torch.zeros_like(keep)
        in_topk.scatter_(1, topk[slot[rc], rj], True)
        masked_rows = ~no_mask[rows_c].to(dev)
        keep &= in_topk | ~masked_rows[:, None]
        temp = (torch.rand(C, generator=dev_gen, device=dev) * 2.0).clamp_min(1e-3)[rc]   # U(0, 2) per child
        logits = (lp / temp[:, None]).masked_fill(~keep, -torch.inf)
        probs = torch.softmax(logits - logits.max(-1, keepdim=True).values, dim=-1)
        chosen[rc, rj] = torch.multinomial(probs, 1, generator=dev_gen).squeeze(1)
    kids = torch.where(edit.to(dev), chosen, parents[slot])
    if bool(swap.any()):
        ci = torch.nonzero(swap).squeeze(1)
        a, b = sa[ci].to(dev), sb[ci].to(dev)
        cd = ci.to(dev)
        ta, tb = kids[cd, a].clone(), kids[cd, b].clone()
        kids[cd, a], kids[cd, b] = tb, ta
    return Children(tokens=kids, slot=slot, slot_host=slot_host, first=first.numpy())


def lagrangian(act: torch.Tensor, ce: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """L_λ(t) = f(t) − λ·CE(t) for every λ and candidate: [P], [P], [M] → [M, P] (NaN → −inf)."""
    a = torch.nan_to_num(act.double(), nan=-torch.inf)
    c = torch.nan_to_num(ce.double(), nan=torch.inf)
    out = a[None, :] - lambdas.double()[:, None] * c[None, :]
    return torch.nan_to_num(out, nan=-torch.inf)


def select_with_replacement(act: torch.Tensor, ce: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Paper §2 step 3: for each λ_i the best candidate under L_λi, chosen independently (with
    replacement: one candidate may fill several slots).

    Args:
        act, ce: [P] float over the pool (parents ∪ children).
        lambdas: [M] float.
    Returns:
        int64 [M] pool indices.
    """
    return lagrangian(act, ce, lambdas).argmax(dim=1)


def restart_choice(act: torch.Tensor, ce: torch.Tensor, lam_r: float) -> int:
    """Paper §2 restart: the population member optimal under L_λr (λ_r as drawn, not ignored)."""
    return int(lagrangian(act, ce, torch.tensor([lam_r], device=act.device)).argmax(dim=1)[0])
