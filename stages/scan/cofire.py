"""Co-firing statistics gathered inside the scan's one corpus pass (issue 12, items 2 and 3).

Both need every latent's firing, not only the targets': the scan encodes each batch once with
all d_sae latents (``post > 0`` on corpus tokens: BOS and padding excluded) and, on the device,

* **co-occurrence** (Neuronpedia-style "similar by co-activation"): each context is cut into
  consecutive windows of ``scan.cooccurrence_window`` tokens; per window, which latents fire
  anywhere in it. Per target latent j it counts, for every latent k, the windows where both fire
  (int64 [L, d_sae]), and per latent the windows where it fires (int64 [d_sae]). The Jaccard
  index ``|j ∧ k| / |j ∨ k|`` ranks co-occurrence neighbours (:func:`cooccurrence_top`). Memory
  is O(L · d_sae) whatever the corpus length; one [W, L]ᵀ @ [W, d_sae] product per batch.
* **hard negatives** (delphi's "neighbour" non-activating examples): contexts where one of
  target j's decoder-cosine neighbours (:func:`stages.features.decoder_neighbours`) fires and j
  fires nowhere; a uniform sample of them per latent (priority sampling, as the scan's other
  samples: independent of batching and of where a scan was interrupted), each shown around the
  neighbour's strongest token, with the neighbour's id and post-activation there.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from reverie.stages.scan.topk import priorities

SALT_HARD_NEGATIVE = 6


def window_firing(fires: torch.Tensor, body: torch.Tensor, w: int) -> torch.Tensor:
    """Which latents fire in each ``w``-token window of each context.

    Args:
        fires: bool [B, T, D], firing on corpus tokens (already masked by ``body``).
        body: bool [B, T], corpus tokens.
        w: window length in tokens (consecutive, non-overlapping, from position 0; the last one may be short).
    Returns:
        bool [W, D]: the windows holding at least one corpus token, in order.
    """
    B, T, D = fires.shape
    pad = (-T) % w
    f = F.pad(fires, (0, 0, 0, pad)).view(B, (T + pad) // w, w, D).any(2).reshape(-1, D)
    keep = F.pad(body, (0, pad)).view(B, (T + pad) // w, w).any(2).reshape(-1)
    return f[keep]


def update_cofiring(state: Any, fires: torch.Tensor, post: torch.Tensor, body: torch.Tensor, ctx_idx: np.ndarray,
                    make_example: Callable[[int, int, int], dict[str, Any]]) -> None:
    """Merge one batch into the state's co-occurrence counts and hard-negative samples.

    Args:
        state: the :class:`stages.scan.stage.ScanState` (fields ``cooc``, ``win_fires``,
            ``n_cooc_windows``, ``cooc_window``, ``hardneg``, ``hn_ids``).
        fires: bool [B, T, d_sae] every latent's firing on corpus tokens.
        post: float [B, T, d_sae] every latent's post-activation (same device).
        body: bool [B, T] corpus tokens (same device).
        ctx_idx: int64 [B] the contexts' indices in the stream.
        make_example: ``(b, j, pos) -> payload`` of target slot j shown around position ``pos`` of context b.
    """
    lat = torch.as_tensor(state.latents, dtype=torch.long, device=fires.device)
    if state.cooc is not None and state.cooc_window > 0:
        wf = window_firing(fires, body, state.cooc_window).float()
        state.cooc += torch.round(wf[:, lat].T @ wf).long().cpu().numpy()
        state.win_fires += wf.sum(0).long().cpu().numpy()
        state.n_cooc_windows += int(wf.shape[0])
    if state.hardneg is not None and state.hardneg.k > 0 and state.hn_ids is not None and len(state.hn_ids):
        ctx_any = fires.any(1)  # [B, D]
        nb = torch.as_tensor(state.hn_ids, dtype=torch.long, device=fires.device)  # [L, K]
        cand = (ctx_any[:, nb].any(-1) & ~ctx_any[:, lat]).cpu().numpy()  # [B, L]
        if not cand.any():
            return
        pr = priorities(ctx_idx[:, None], np.asarray(state.latents, dtype=np.int64)[None, :], SALT_HARD_NEGATIVE)
        for b, j in zip(*np.nonzero(cand)):
            b, j = int(b), int(j)
            if pr[b, j] >= state.hardneg.threshold(j):
                continue
            vals = torch.where(fires[b][:, nb[j]], post[b][:, nb[j]].float(), 0.0)  # [T, K], corpus tokens only
            flat = int(vals.argmax())
            pos, k = divmod(flat, vals.shape[1])

            def build(b=b, j=j, pos=pos, k=k, act=float(vals[pos, k])) -> dict[str, Any]:
                return {**make_example(b, j, pos), "context_idx": int(ctx_idx[b]), "neighbour": int(state.hn_ids[j][k]), "neighbour_act": act}

            state.hardneg.offer(j, float(pr[b, j]), int(ctx_idx[b]), build)


def cooccurrence_top(state: Any, j: int, k: int) -> tuple[list[int], list[float], list[tuple[int, int, int]]]:
    """The ``k`` latents with the highest Jaccard co-occurrence with target slot ``j`` (those that
    co-fire at least once; self excluded).

    Returns:
        ``(ids, jaccard, counts)`` with counts ``(n_both, n_latent, n_neighbour)`` in windows.
    """
    if state.cooc is None or state.n_cooc_windows == 0:
        return [], [], []
    lat = int(state.latents[j])
    co = state.cooc[j].astype(np.float64)
    nj = float(state.win_fires[lat])
    union = nj + state.win_fires.astype(np.float64) - co
    jac = np.where(union > 0, co / np.maximum(union, 1.0), 0.0)
    jac[lat] = -1.0
    jac[co <= 0] = -1.0
    order = [int(i) for i in np.argsort(-jac, kind="stable")[:k] if jac[i] > 0]
    return order, [float(jac[i]) for i in order], [(int(state.cooc[j][i]), int(nj), int(state.win_fires[i])) for i in order]
