"""A lean forward pass of a transformer_lens ``HookedTransformer`` for EPO's hot loop.

EPO evaluates thousands of 12-token prompts per second; on small models the cost is dominated
not by matrix products but by the elementwise work and Python around them (hook points,
einsum attention with an explicit mask, rotary by strided copies, separate Q/K/V products).
:class:`LeanForward` computes the same function from the *same weight tensors* (no copy of
the model; Q, K and V fused into one matrix product; ``scaled_dot_product_attention``; fused
RMS/LayerNorm), returning what the evaluator reads: the hook activation, the final residual
stream and, when asked, every layer's keys/values.

It covers the decoder-only architectures whose blocks are "pre-norm attention + MLP", sequential
or parallel (GPT-NeoX/Pythia: both read the same residual), with standard or rotary positions
(GPT-2, GPT-J/NeoX-style rotary, Llama/Mistral-style GQA and gated MLPs, Pythia-style split rotary); :func:`unsupported` names the first feature it does not cover,
and the evaluator then keeps transformer_lens's own forward. A test checks hook activations and
logits against transformer_lens (≤ 1e-4) with and without cached keys/values.

Keys are cached *after* rotary (transformer_lens caches them before and re-rotates every
step); the cache layout per layer is ``(keys, values)`` of shape [B, S, n_kv_heads, d_head].
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch
import torch.nn.functional as F

from reverie.sae_targets.backend import bridge_lean_unsupported, bridge_lean_weights, is_bridge

log = logging.getLogger("reverie.dream.lean")

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}


def unsupported(model, hook_name: str) -> str | None:
    """Why :class:`LeanForward` cannot run ``model`` exactly (None = it can).

    Conservative: any configuration flag that changes the block's arithmetic away from the
    plain pre-norm attention + MLP block is a reason.
    """
    cfg = model.cfg
    checks = [
        (_HOOK.match(hook_name) is None, f"hook {hook_name!r} is not a residual-stream hook"),
        (cfg.positional_embedding_type not in ("standard", "rotary"), f"positional embedding {cfg.positional_embedding_type!r}"),
        (cfg.normalization_type not in _NORMS, f"normalization {cfg.normalization_type!r}"),
        (getattr(cfg, "attn_only", False), "attention-only model"),
        (getattr(cfg, "parallel_attn_mlp", False) and hook_name.endswith("hook_resid_mid"), "no resid_mid in a parallel block"),
        (bool(getattr(cfg, "num_experts", None)), "mixture of experts"),
        (bool(getattr(cfg, "use_local_attn", False)) or any(t != "global" for t in (getattr(cfg, "attn_types", None) or [])), "local attention"),
        ((getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0, "attention soft cap"),
        (bool(getattr(cfg, "use_qk_norm", False)), "QK norm"),
        (bool(getattr(cfg, "use_normalization_before_and_after", False)), "post-norms"),
        (getattr(cfg, "clip_qkv", None) is not None, "QKV clipping"),
        (bool(getattr(cfg, "use_logn_attn", False)), "log-n attention scaling"),
        (bool(getattr(cfg, "use_dynamic_ntk_rope", False)), "dynamic NTK rotary"),
        (bool(getattr(cfg, "use_split_qkv_input", False)) or bool(getattr(cfg, "use_attn_in", False)), "split attention inputs"),
        (getattr(cfg, "original_architecture", None) in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "Gemma2ForCausalLM",
                                                         "Gemma3ForCausalLM", "BertForMaskedLM", "T5ForConditionalGeneration"), "architecture"),
        ((getattr(cfg, "attention_dir", "causal") or "causal") != "causal", "bidirectional attention"),
        (bool(getattr(cfg, "final_rms", False)) and cfg.normalization_type not in ("RMS", "RMSPre"), "final RMS"),
        (cfg.act_fn is not None and "solu" in cfg.act_fn, "SoLU"),
    ]
    for bad, why in checks:
        if bad:
            return why
    b0 = model.blocks[0]
    if getattr(b0.mlp, "W_gate", None) is not None and getattr(b0.mlp, "ln", None) is not None:
        return "layer-norm activation in the gated MLP"
    if type(model.embed).__name__ != "Embed" or getattr(cfg, "scale_embeddings", False) or hasattr(model.embed, "scale"):
        return "scaled or non-standard embedding"
    return None


class LeanForward:
    """The forward pass of ``model`` up to its final residual stream, from shared weights.

    Args:
        model: a transformer_lens ``HookedTransformer`` (see :func:`unsupported`).
        hook_name: the residual-stream hook whose activation is returned
            (``blocks.L.hook_resid_pre | mid | post``).
        dtype: dtype of the matrix products (weights are cast once; e.g. ``torch.bfloat16``
            for tensor cores / AMX). The residual stream, norms, attention softmax and the
            returned tensors stay float32. None = the model's dtype (no copy).
        checked: the caller has already checked that the model is covered (a weight view built
            by :func:`lean_forward` for a TransformerBridge, which has no
            HookedTransformer config to check here).
    Raises:
        ValueError: :func:`unsupported` names a reason.
    """

    def __init__(self, model, hook_name: str, dtype: torch.dtype | None = None, checked: bool = False):
        why = None if checked else unsupported(model, hook_name)
        if why:
            raise ValueError(f"LeanForward does not cover this model: {why}")
        self.model, self.cfg = model, model.cfg
        m = _HOOK.match(hook_name)
        self.hook_layer, self.hook_where = int(m.group(1)), m.group(2)
        cfg = self.cfg
        self.H = cfg.n_heads
        self.Hkv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.dh = cfg.d_head
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.dtype = dtype if dtype is not None else model.W_E.dtype
        self.cast = self.dtype != model.W_E.dtype
        self.layers = [self._layer(b) for b in model.blocks]
        self.w_u = self._w(model.W_U.T.contiguous())
        self.b_u = self._w(model.b_U)

    def _w(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t.to(self.dtype) if self.cast else t)

    def _mm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T + b in ``self.dtype``, returned in x's dtype."""
        if not self.cast:
            return F.linear(x, w, b)
        return F.linear(x.to(self.dtype), w, b).to(x.dtype)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """[..., d_model] final residual (after the final norm) → [..., V] float32 logits."""
        return self._mm(resid, self.w_u, self.b_u).float()

    # ------------------------------------------------------------------ weights (views, fused once)
    def _layer(self, block) -> dict:
        a = block.attn
        W_K = a._W_K if hasattr(a, "_W_K") else a.W_K
        W_V = a._W_V if hasattr(a, "_W_V") else a.W_V
        b_K = a._b_K if hasattr(a, "_b_K") else a.b_K
        b_V = a._b_V if hasattr(a, "_b_V") else a.b_V
        d = self.cfg.d_model
        w_qkv = torch.cat([a.W_Q.permute(1, 0, 2).reshape(d, -1), W_K.permute(1, 0, 2).reshape(d, -1),
                           W_V.permute(1, 0, 2).reshape(d, -1)], dim=1).T.contiguous()        # [(H+2Hkv)·dh, d]
        b_qkv = torch.cat([a.b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)])
        mlp = block.mlp
        gated = getattr(mlp, "W_gate", None) is not None
        out = {
            "ln1": getattr(block, "ln1", None), "ln2": getattr(block, "ln2", None),
            "w_qkv": self._w(w_qkv), "b_qkv": self._w(b_qkv),
            "w_o": self._w(a.W_O.reshape(-1, d).T.contiguous()), "b_o": self._w(a.b_O),
            "scale": 1.0 / float(a.attn_scale),
            "w_in": self._w(mlp.W_in.T.contiguous()), "b_in": mlp.b_in, "w_out": self._w(mlp.W_out.T.contiguous()), "b_out": self._w(mlp.b_out),
            "w_gate": self._w(mlp.W_gate.T.contiguous()) if gated else None, "act": mlp.act_fn,
        }
        if self.rotary:
            out["sin"], out["cos"] = a.rotary_sin, a.rotary_cos
        return out

    def _norm(self, ln, x: torch.Tensor) -> torch.Tensor:
        t = self.cfg.normalization_type
        if t is None or ln is None:
            return x
        d = (x.shape[-1],)
        if t == "LN":
            return F.layer_norm(x, d, ln.w, ln.b, ln.eps)
        if t == "LNPre":
            return F.layer_norm(x, d, None, None, ln.eps)
        if t == "RMS":
            return F.rms_norm(x, d, ln.w, ln.eps)
        return F.rms_norm(x, d, None, ln.eps)                                        # RMSPre

    def _rotate(self, x: torch.Tensor, L: dict, start: int) -> torch.Tensor:
        """Rotary on [B, P, heads, dh] at absolute positions start.. (transformer_lens's angles)."""
        rd = self.cfg.rotary_dim
        P = x.shape[1]
        sin = L["sin"][start:start + P, None, :].to(x.dtype)
        cos = L["cos"][start:start + P, None, :].to(x.dtype)
        xr = x[..., :rd]
        if self.cfg.rotary_adjacent_pairs:
            pairs = xr.unflatten(-1, (rd // 2, 2))
            flip = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        else:
            h = rd // 2
            flip = torch.cat([-xr[..., h:], xr[..., :h]], dim=-1)
        rot = xr * cos + flip * sin
        return rot if rd == x.shape[-1] else torch.cat([rot, x[..., rd:]], dim=-1)

    # ------------------------------------------------------------------ forward
    def run(self, tokens: torch.Tensor, start: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None,
            record_kv: bool = False, embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Forward ``tokens`` = positions [start, start + L) given keys/values of positions < start.

        Args:
            tokens: [B, L] int64.
            start: absolute position of the first token (its rotary / learned position).
            past: per layer ``(keys, values)`` [B, start, n_kv_heads, d_head] (keys rotated), or None.
            record_kv: also return every layer's keys/values for positions [0, start + L).
            embed_hook: applied to the token embeddings [B, L, d_model] (e.g. the one-hot swap
                that carries token gradients); positional embeddings are added after it.
        Returns:
            ``(hook activation [B, L, d_model], final residual [B, L, d_model], kv or None)``.
        """
        cfg = self.cfg
        B, Lq = tokens.shape
        x = F.embedding(tokens, self.model.W_E)
        if embed_hook is not None:
            x = embed_hook(x)
        if cfg.positional_embedding_type == "standard":
            x = x + self.model.W_pos[start:start + Lq][None]
        S = start + Lq
        mask = None
        if Lq > 1 or start > 0:
            mask = torch.arange(S, device=tokens.device)[None, :] <= (start + torch.arange(Lq, device=tokens.device))[:, None]
        acts, kv = None, [] if record_kv else None
        H, Hkv, dh = self.H, self.Hkv, self.dh
        for i, L in enumerate(self.layers):
            if i == self.hook_layer and self.hook_where == "pre":
                acts = x
            h = self._norm(L["ln1"], x)
            qkv = self._mm(h, L["w_qkv"], L["b_qkv"])
            q, k, v = qkv.split([H * dh, Hkv * dh, Hkv * dh], dim=-1)
            q, k, v = q.unflatten(-1, (H, dh)), k.unflatten(-1, (Hkv, dh)), v.unflatten(-1, (Hkv, dh))
            if self.rotary:
                q, k = self._rotate(q, L, start), self._rotate(k, L, start)
            if past is not None:
                k = torch.cat([past[i][0], k], dim=1)
                v = torch.cat([past[i][1], v], dim=1)
            if record_kv:
                kv.append((k, v))
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               scale=L["scale"], enable_gqa=Hkv != H)
            attn_out = self._mm(z.transpose(1, 2).flatten(2), L["w_o"], L["b_o"])
            if self.parallel:              # GPT-NeoX: the MLP reads the block's input, not resid_mid
                h = self._norm(L["ln2"], x)
                x = x + attn_out
            else:
                x = x + attn_out
                if i == self.hook_layer and self.hook_where == "mid":
                    acts = x
                h = self._norm(L["ln2"], x)
            if L["w_gate"] is not None:
                m = L["act"](self._mm(h, L["w_gate"])) * self._mm(h, L["w_in"]) + L["b_in"]
            else:
                m = L["act"](self._mm(h, L["w_in"], self._w(L["b_in"])))
            x = x + self._mm(m, L["w_out"], L["b_out"])
            if i == self.hook_layer and self.hook_where == "post":
                acts = x
        return acts, x, kv


def lean_unsupported(model, hook_name: str) -> str | None:
    """Why the lean forward cannot run ``model`` exactly (None = it can): for a HookedTransformer
    :func:`unsupported`; for a TransformerBridge, :func:`sae_targets.backend.bridge_lean_unsupported`
    and a hook point that is not a residual-stream hook."""
    if not is_bridge(model):
        return unsupported(model, hook_name)
    why = bridge_lean_unsupported(model)
    if why is None and _HOOK.match(hook_name) is None:
        why = f"hook {hook_name!r} is not a residual-stream hook"
    return why


def lean_forward(model, hook_name: str, dtype: torch.dtype | None = None) -> "LeanForward | None":
    """A :class:`LeanForward` of ``model`` (either backend: a bridge's weights through
    :func:`sae_targets.backend.bridge_lean_weights`), or None when :func:`lean_unsupported` names a
    reason (the evaluator then uses :func:`sae_targets.backend.tail_forward`).

    Args:
        hook_name: the SAE's residual-stream hook.
        dtype: matrix-product dtype (e.g. ``torch.bfloat16``), None = the model's.
    """
    why = lean_unsupported(model, hook_name)
    if why is not None:
        log.info("lean forward off: %s", why)
        return None
    if not is_bridge(model):
        return LeanForward(model, hook_name, dtype=dtype)
    return LeanForward(bridge_lean_weights(model), hook_name, dtype=dtype, checked=True)
