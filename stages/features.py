"""Per-latent feature facts that need only the weights: the decoder direction's logit lens and
its nearest decoder neighbours (issue 12, items 1 and 2).

* **Logit lens** (SAEDashboard ``LogitsTableData``, Neuronpedia's first panel): the logits the
  decoder direction writes straight into the unembedding, ``W_dec[i] @ W_U`` (float32 [d_vocab]),
  taken *through the final norm's scale* when the model keeps one as a separate weight
  (``ln_final.w``, RMSNorm or LayerNorm with ``fold_ln=False``): ``(W_dec[i] * ln_final.w) @ W_U``.
  When transformer_lens folded the scale into ``W_U`` (``fold_ln=True``, ``LNPre``/``RMSPre``) the
  plain product already includes it; the row's ``norm_scale`` says which case applied. The norm's
  division by the residual's RMS is not applied (it depends on the context), nor ``b_U`` (a
  constant per token that does not depend on the latent). ``W_dec[i]`` is used as stored (not
  unit-normalized), as SAEDashboard does. Stored per (SAE, model, latent): the 10 most positive
  and 10 most negative tokens (ids, display pieces via ``Subject.decode_tokens``, logits), the
  histogram of all d_vocab logits, their mean and standard deviation.
* **Decoder-cosine neighbours**: the latents whose unit decoder directions have the highest
  cosine similarity with latent i (self excluded), over all d_sae latents. They also choose the
  scan's hard negatives (contexts where a neighbour fires and the latent does not).

Both are computed once per (SAE, latent) and kept in DuckDB (``logit_lens``,
``latent_neighbours`` with ``kind = 'decoder_cosine'``); the co-occurrence neighbours come from
the scan's pass (``kind = 'cooccurrence'``, see :mod:`stages.scan.stage`).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from reverie.pipeline.store import Store, now

log = logging.getLogger("reverie.features")

LENS_K = 10          # tokens listed each way (SAEDashboard's default table length)
LENS_BINS = 40       # bins of the logit histogram
NEIGHBOURS_K = 5     # neighbours stored per latent and kind


def unembed_scale(model: Any) -> tuple[torch.Tensor | None, str]:
    """How the final norm enters the logit lens of a transformer_lens model.

    Returns:
        ``(scale, note)``: ``scale`` float [d_model] to multiply a residual direction by before
        ``W_U`` (``ln_final.w``), or None when there is none to apply; ``note`` says which case
        holds, in words, for the page.
    """
    ln = getattr(model, "ln_final", None)
    w = getattr(ln, "w", None) if ln is not None else None
    ntype = getattr(model.cfg, "normalization_type", None)
    if isinstance(w, torch.Tensor):
        return w.detach(), f"through the final norm's scale (ln_final.w of {ntype}; its division by the context's RMS is not applied)"
    if ntype in ("LNPre", "RMSPre"):
        return None, f"final norm's scale folded into W_U ({ntype}: fold_ln); its division by the context's RMS is not applied"
    return None, "the model has no final norm scale: W_dec @ W_U as is"


def lens_logits(subject: Any, latents: Sequence[int]) -> tuple[torch.Tensor, str]:
    """Logit-lens logits of decoder directions.

    Args:
        subject: a loaded :class:`sae_targets.loading.Subject`.
        latents: L latent ids.
    Returns:
        ``(logits, note)``: float32 [L, d_vocab] on the CPU, ``(W_dec[latents] * scale) @ W_U``
        (see :func:`unembed_scale`), and the note saying which scale was used.
    Raises:
        ValueError: the SAE's width differs from the model's residual width (the hook is not on
            the residual stream, so the decoder direction cannot be unembedded).
    """
    model, sae = subject.model, subject.sae
    d_model = int(model.cfg.d_model)
    if int(sae.cfg.d_in) != d_model:
        raise ValueError(f"no logit lens: the SAE reads {sae.cfg.d_in}-wide activations at {subject.hook_name}, "
                         f"the residual stream is {d_model} wide")
    idx = torch.as_tensor([int(i) for i in latents], dtype=torch.long, device=sae.W_dec.device)
    with torch.no_grad():
        d = sae.W_dec[idx].float()
        scale, note = unembed_scale(model)
        if scale is not None:
            d = d * scale.to(d.device).float()
        logits = d.to(model.W_U.device) @ model.W_U.float()
    return logits.cpu(), note


def logit_lens_rows(subject: Any, latents: Sequence[int], k: int = LENS_K, bins: int = LENS_BINS) -> list[dict[str, Any]]:
    """``logit_lens`` rows of ``latents`` (see the module docstring).

    Returns:
        One dict per latent: top/bottom ``k`` token ids, display pieces and logits (top: descending,
        bottom: ascending), ``bins``-bin histogram of all d_vocab logits (edges and counts), mean, std.
    Raises:
        ValueError: see :func:`lens_logits`.
    """
    if not latents:
        return []
    logits, note = lens_logits(subject, latents)
    rows = []
    for j, lat in enumerate(latents):
        v = logits[j].numpy().astype(np.float64)
        order = np.argsort(-v, kind="stable")
        top, bottom = order[:k], order[::-1][:k]
        counts, edges = np.histogram(v, bins=bins)
        rows.append({
            "sae_key": subject.sae_key, "model_key": subject.model_key, "latent": int(lat), "sae_sha": subject.sae_sha or "",
            "norm_scale": note, "d_vocab": int(v.size),
            "top_ids": [int(i) for i in top], "top_tokens": subject.decode_tokens([int(i) for i in top]), "top_logits": [float(v[i]) for i in top],
            "bottom_ids": [int(i) for i in bottom], "bottom_tokens": subject.decode_tokens([int(i) for i in bottom]),
            "bottom_logits": [float(v[i]) for i in bottom],
            "hist_edges": [float(e) for e in edges], "hist_counts": [int(c) for c in counts],
            "mean": float(v.mean()), "std": float(v.std()), "created_at": now(),
        })
    return rows


def decoder_neighbours(sae: Any, latents: Sequence[int], k: int = NEIGHBOURS_K) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` latents with the highest decoder cosine similarity to each of ``latents``.

    Args:
        sae: a sae-lens SAE (``W_dec`` [d_sae, d_in]).
        latents: L latent ids.
    Returns:
        ``(ids, cos)``: int64 [L, k] neighbour ids (self excluded), float64 [L, k] their cosine
        similarities, highest first.
    """
    if not latents:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k))
    with torch.no_grad():
        W = sae.W_dec.float()
        W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        idx = torch.as_tensor([int(i) for i in latents], dtype=torch.long, device=W.device)
        sims = W[idx] @ W.T  # [L, d_sae]
        sims[torch.arange(len(latents), device=W.device), idx] = -float("inf")
        k = min(k, W.shape[0] - 1)
        val, ids = sims.topk(k, dim=-1)
    return ids.cpu().numpy().astype(np.int64), val.cpu().double().numpy()


def neighbour_rows(source_id: str, kind: str, latent: int, ids: Sequence[int], values: Sequence[float],
                   counts: Sequence[tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """``latent_neighbours`` rows of one latent (rank 0 = most similar).

    Args:
        source_id: the SAE key (``'decoder_cosine'``) or the scan id (``'cooccurrence'``).
        counts: per neighbour ``(n_both, n_latent, n_neighbour)`` token windows (co-occurrence only).
    """
    return [{"source_id": source_id, "latent": int(latent), "kind": kind, "rank": r, "neighbour": int(n), "value": float(v),
             "n_both": None if counts is None else int(counts[r][0]), "n_latent": None if counts is None else int(counts[r][1]),
             "n_neighbour": None if counts is None else int(counts[r][2])}
            for r, (n, v) in enumerate(zip(ids, values))]


def ensure_features(subject: Any, store: Store, latents: Sequence[int]) -> int:
    """Compute and store the logit lens and decoder-cosine neighbours of ``latents`` that the
    database lacks for this SAE (same ``sae_key``, ``model_key`` and SAE content hash).

    A hook off the residual stream stores no logit lens (logged once); neighbours are still stored.

    Returns:
        Number of latents computed.
    """
    latents = sorted({int(i) for i in latents})
    if not latents or "logit_lens" not in store.tables():
        return 0
    have = {int(r["latent"]) for r in store.fetch(
        "SELECT latent FROM logit_lens WHERE sae_key = ? AND model_key = ? AND sae_sha = ?",
        [subject.sae_key, subject.model_key, subject.sae_sha or ""])}
    have_nb = {int(r["latent"]) for r in store.fetch(
        "SELECT DISTINCT latent FROM latent_neighbours WHERE source_id = ? AND kind = 'decoder_cosine'", [subject.sae_key])}
    missing = [i for i in latents if i not in have]
    missing_nb = [i for i in latents if i not in have_nb]
    if not missing and not missing_nb:
        return 0
    try:
        lens = logit_lens_rows(subject, missing)
    except ValueError as e:
        log.info("%s", e)
        lens = []
    ids, cos = decoder_neighbours(subject.sae, missing_nb)
    with store.transaction():
        for row in lens:
            store.replace("logit_lens", {"sae_key": row["sae_key"], "model_key": row["model_key"], "latent": row["latent"]}, [row])
        for j, lat in enumerate(missing_nb):
            store.replace("latent_neighbours", {"source_id": subject.sae_key, "kind": "decoder_cosine", "latent": lat},
                          neighbour_rows(subject.sae_key, "decoder_cosine", lat, ids[j], cos[j]))
    return len(set(missing) | set(missing_nb))
