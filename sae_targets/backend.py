"""The model-backend seam: every place where reverie's use of TransformerLens differs between a
``HookedTransformer`` (backend ``hooked``, deprecated in TransformerLens 3.x, removed in 4) and a
``TransformerBridge`` in compatibility mode (backend ``bridge``), chosen by ``model.backend``.

In compatibility mode the bridge answers the calls reverie makes of a model the way a
``HookedTransformer`` does (measured on the demo model, transformer_lens 3.9, transformers 5.24):
hook names (``blocks.L.hook_resid_pre``, ``hook_embed``, ``ln_final``, ...), ``hook_dict``,
``model(tokens)`` logits, ``model(tokens, stop_at_layer=L)``, ``run_with_hooks`` (with
``stop_at_layer``), ``cfg.n_layers / d_model / d_vocab / n_ctx / device``, ``W_E``, ``W_U``,
``ln_final(x)``, ``unembed(x)``, ``named_parameters``. Those stay plain model calls (hook
activations in :mod:`sae_targets.contexts`, logits, the logit lens); only the differences go
through here:

* loading (:func:`load_bridge`): ``TransformerBridge.boot_transformers`` on a preloaded HF model +
  reverie's tokenizer (local folder) or on the hub name, then ``enable_compatibility_mode`` with
  the same weight-processing flags sae-lens asks of ``from_pretrained_no_processing``;
* the dream evaluator's forward from a position with cached keys/values (:func:`tail_forward`):
  transformer_lens's ``TransformerLensKeyValueCache`` (hooked) or HF's ``DynamicCache`` (bridge);
* the weights the lean forward (:mod:`stages.dream.lean`) reads (:func:`bridge_lean_weights`) and
  whether it covers the bridge (:func:`bridge_lean_unsupported`).

The bridge's own attention (transformer_lens 3.9) looks for the cache under the keyword
``past_key_values`` / ``layer_past``, while transformers 5.x hands it to Llama-style attention
layers as ``cache``: there, given only the model's cache argument, the bridge silently attends to
the new tokens alone. :class:`BridgeTail` then passes the cache as ``layer_past`` as well
(forwarded unchanged through HF's ``**kwargs`` to each attention). Which way works is checked once
per model (cached vs uncached forward); when none does (measured: Gemma-3, whose sliding-window
cache layers keep only the window), the dream evaluator runs without a cache (same numbers, slower).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Literal

import torch

BackendName = Literal["hooked", "bridge"]
#: HF architectures whose bridge weights :func:`bridge_lean_weights` maps onto the lean forward (tested
#: against transformers' forward on the demo Llama model); others run the bridge's own forward
LEAN_BRIDGE_ARCHITECTURES = ("LlamaForCausalLM",)
#: rotary tables of the lean forward cover at most this many positions on the bridge
_MAX_ROTARY_POSITIONS = 8192

log = logging.getLogger("reverie.sae_targets.backend")

KV = list[tuple[torch.Tensor, torch.Tensor]]


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a transformer_lens ``TransformerBridge`` (checked by class name, so
    that a HookedTransformer-only caller never imports the bridge)."""
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def backend_name(model: Any) -> BackendName:
    """``'bridge'`` for a ``TransformerBridge``, else ``'hooked'``."""
    return "bridge" if is_bridge(model) else "hooked"


# --------------------------------------------------------------------------- loading

def load_bridge(source: str, device: str, dtype: torch.dtype, kwargs: dict[str, Any], hf_model: Any = None,
                tokenizer: Any = None) -> Any:
    """A ``TransformerBridge`` in compatibility mode, in eval mode with gradients off for weights.

    Args:
        source: a hub name (e.g. ``'gpt2'``) or a local Hugging Face folder.
        device: torch device string ('cpu', 'cuda', ...).
        dtype: weights dtype (float32 / float16 / bfloat16).
        kwargs: the SAE's ``model_from_pretrained_kwargs``: the weight-processing flags
            (``fold_ln``, ``center_writing_weights``, ...; all off unless set, as sae-lens's
            ``from_pretrained_no_processing``) and ``n_ctx``; others are logged as not applied.
        hf_model: a ``transformers`` causal LM already loaded from ``source`` (moved to ``device``
            here), or None to let the bridge load it.
        tokenizer: the tokenizer the bridge keeps (reverie's own, see
            :func:`sae_targets.loading.load_tokenizer`), or None to let the bridge load one.
    Returns:
        The bridge (``model.cfg.device`` = ``device``).
    Raises:
        Whatever ``boot_transformers`` / ``enable_compatibility_mode`` raise (the caller wraps
        them in a ``LoadError`` naming the model).
    """
    from reverie.sae_targets.loading import NO_PROCESSING, processing_flags

    from transformer_lens.model_bridge import TransformerBridge

    if hf_model is not None:
        hf_model = hf_model.to(device)
    extra = {"n_ctx": int(kwargs["n_ctx"])} if kwargs.get("n_ctx") else {}
    model = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **extra)
    flags = processing_flags(kwargs)
    # disable_warnings: the bridge's notes on legacy hook names, which reverie uses on purpose
    model.enable_compatibility_mode(disable_warnings=True, no_processing=not any(flags.values()), **flags)
    ignored = sorted(set(kwargs) - set(NO_PROCESSING) - {"n_ctx"})
    if ignored:
        log.warning("the SAE's model_from_pretrained_kwargs %s are not applied by the bridge backend (%s)", ignored, source)
    model._reverie_processing = flags
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- forward from cached keys/values

class HookedTail:
    """transformer_lens ``HookedTransformer`` forward of positions [start, T) given the keys/values
    of positions < start (``TransformerLensKeyValueCache``; keys cached before rotary).

    Args:
        model: the ``HookedTransformer``.
        hook_name: the SAE's hook point; ``last_hook``: the final block's ``hook_resid_post``.
        device: the model's device.
    """

    caches = True

    def __init__(self, model: Any, hook_name: str, last_hook: str, device: torch.device):
        self.model, self.hook_name, self.last_hook, self.device = model, hook_name, last_hook, device

    def _hooks(self, store: dict[str, torch.Tensor], embed_hook: Callable[[torch.Tensor], torch.Tensor] | None) -> list[tuple[str, Callable]]:
        """Forward hooks that put the hook activation and the last residual in ``store`` ('act',
        'resid') and apply ``embed_hook`` at ``hook_embed``."""
        hooks: list[tuple[str, Callable]] = [(self.hook_name, lambda x, hook: store.__setitem__("act", x)),
                                             (self.last_hook, lambda x, hook: store.__setitem__("resid", x))]
        if embed_hook is not None:
            hooks.append(("hook_embed", lambda e, hook: embed_hook(e)))
        return hooks

    def run(self, tail: torch.Tensor, start: int, past: KV | None, record_kv: bool = False,
            embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """Forward ``tail`` (int64 [B, L], absolute positions start..start+L−1).

        Args:
            past: per layer (keys, values) [B, start, n_kv_heads, d_head], or None (start = 0).
            record_kv: also return every layer's keys/values of positions [0, start + L).
            embed_hook: applied to the token embeddings [B, L, d_model] (``hook_embed``).
        Returns:
            ``(hook activation [B, L, d_in], final residual before the final norm [B, L, d_model],
            kv or None)``, float, on the model's device.
        """
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

        B, L = tail.shape
        store: dict[str, torch.Tensor] = {}
        hooks = self._hooks(store, embed_hook)
        kwargs: dict[str, Any] = {}
        cache = None
        if past is not None or record_kv:
            cfg = self.model.cfg
            entries = [Entry(past_keys=k, past_values=v) for k, v in past] if past is not None else \
                [Entry.init_cache_entry(cfg, self.device, B) for _ in range(cfg.n_layers)]
            cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=torch.ones(B, start, dtype=torch.int, device=self.device))
            if not record_kv:
                cache.freeze()
            kwargs = {"past_kv_cache": cache, "attention_mask": torch.ones(B, L, dtype=torch.long, device=self.device)}
        self.model.run_with_hooks(tail, return_type=None, fwd_hooks=hooks, **kwargs)
        kv = [(e.past_keys, e.past_values) for e in cache.entries] if record_kv else None
        return store["act"], store["resid"], kv


class BridgeTail(HookedTail):
    """``TransformerBridge`` forward of positions [start, T) given cached keys/values, through the
    bridge's hooks and HF's ``DynamicCache`` (keys cached after rotary, stored here as
    [B, S, n_kv_heads, d_head] like the other paths). ``caches`` is False when the once-per-model
    check finds cached and uncached forwards disagree in every mode of :attr:`KV_MODES` (then
    ``past`` must be None)."""

    #: ways of handing the cache over, tried in order by the check: 'model' = the HF model's own
    #: cache argument only (measured: NeoX, whose layers pass it on as ``layer_past``); 'layer_past'
    #: = also as ``layer_past``, which HF forwards through ``**kwargs`` to the bridge's attention
    #: (measured: Llama and GPT-2 of transformers 5.24, whose layers call it ``cache``, which the
    #: bridge's attention does not read)
    KV_MODES = ("model", "layer_past")

    def __init__(self, model: Any, hook_name: str, last_hook: str, device: torch.device):
        super().__init__(model, hook_name, last_hook, device)
        self.hf_config = model.original_model.config
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` deprecated)
        params = inspect.signature(type(model.original_model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        mode = getattr(model, "_reverie_kv_mode", "unchecked")
        if mode == "unchecked":
            mode = model._reverie_kv_mode = self._check_cache()
        self.kv_mode: str | None = mode
        self.caches = mode is not None

    def run(self, tail: torch.Tensor, start: int, past: KV | None, record_kv: bool = False,
            embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
            kv_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """As :meth:`HookedTail.run`; ``kv_mode`` overrides the checked mode (:attr:`KV_MODES`).
        Raises RuntimeError when keys/values are passed or asked for while ``caches`` is False."""
        from transformers import DynamicCache

        mode = kv_mode or self.kv_mode
        if (past is not None or record_kv) and mode is None:
            raise RuntimeError("the bridge's key/value cache failed its check on this model; evaluate without prefix_cache")
        B, L = tail.shape
        store: dict[str, torch.Tensor] = {}
        hooks = self._hooks(store, embed_hook)
        kwargs: dict[str, Any] = {}
        cache = None
        if past is not None or record_kv:
            data = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in past] if past is not None else None
            cache = DynamicCache(ddp_cache_data=data, config=self.hf_config)
            pos = torch.arange(start, start + L, device=self.device)[None].expand(B, -1)
            kwargs = {self.cache_kw: cache, "use_cache": True, "position_ids": pos,
                      "attention_mask": torch.ones(B, start + L, dtype=torch.long, device=self.device)}
            if mode == "layer_past":
                kwargs["layer_past"] = cache
        self.model.run_with_hooks(tail, return_type=None, fwd_hooks=hooks, **kwargs)
        kv = [(lay.keys.transpose(1, 2), lay.values.transpose(1, 2)) for lay in cache.layers] if record_kv else None
        return store["act"], store["resid"], kv

    @torch.no_grad()
    def _check_cache(self) -> str | None:
        """The first mode of :attr:`KV_MODES` whose cached forward of the last 4 of 12 tokens
        equals the uncached forward (≤ 1e-4 relative to the residual's largest value), else None
        (with a warning naming what went wrong)."""
        V = int(self.model.cfg.d_vocab)
        toks = (torch.arange(12, device=self.device) * 37 + 5)[None] % V
        whys = []
        for mode in self.KV_MODES:
            try:
                a0, r0, kv = self.run(toks, 0, None, record_kv=True, kv_mode=mode)
                past = [(k[:, :8], v[:, :8]) for k, v in kv]
                a1, r1, _ = self.run(toks[:, 8:], 8, past, kv_mode=mode)
            except Exception as e:  # noqa: BLE001 - any failure means: not this mode
                whys.append(f"{mode}: {type(e).__name__}: {str(e)[-200:]}")
                continue
            scale = float(r0.abs().max()) + 1e-6
            err = max(float((a1 - a0[:, 8:]).abs().max()), float((r1 - r0[:, 8:]).abs().max())) / scale
            if err <= 1e-4:
                return mode
            whys.append(f"{mode}: cached and uncached forwards differ by {err:.2e} (relative)")
        msg = (f"the TransformerBridge's key/value cache does not reproduce its uncached forward on this model ({'; '.join(whys)}); "
               "EPO evaluates every child from position 0 (same numbers, slower). model.backend = \"hooked\" keeps the cache.")
        warnings.warn(msg, stacklevel=3)
        log.warning("%s", msg)
        return None


def tail_forward(model: Any, hook_name: str, device: torch.device) -> HookedTail:
    """The forward-from-cache object for ``model`` (:class:`HookedTail` or :class:`BridgeTail`).

    Args:
        hook_name: the SAE's hook point (the activation returned first).
    """
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    return (BridgeTail if is_bridge(model) else HookedTail)(model, hook_name, last, device)


# --------------------------------------------------------------------------- lean forward weights

def bridge_lean_weights(model: Any) -> Any:
    """A read-only view of a Llama-family bridge's weights in the attribute layout
    :class:`stages.dream.lean.LeanForward` reads from a ``HookedTransformer`` (``blocks[i].attn.W_Q``
    [H, d_model, d_head], ``W_K``/``W_V`` [n_kv_heads, d_model, d_head], ``W_O`` [H, d_head, d_model],
    ``mlp.W_in``/``W_gate`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model], ``ln1.w``, ``W_E``, ``W_U``),
    zero biases, ``attn_scale`` = 1 / HF's ``scaling``, and rotary tables [n_pos, d_head] from HF's
    own rotary embedding (rope scaling included)."""
    cfg = model.cfg
    hf = model.original_model
    dh, H = int(cfg.d_head), int(cfg.n_heads)
    Hkv = int(getattr(cfg, "n_key_value_heads", None) or H)
    d, dt, dev = int(cfg.d_model), model.W_E.dtype, model.W_E.device
    n_pos = min(int(cfg.n_ctx), _MAX_ROTARY_POSITIONS)
    pos = torch.arange(n_pos, device=dev)[None]
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1, n_pos, d, dtype=dt, device=dev), pos)
    z = lambda *s: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
    blocks = []
    for b in model.blocks:
        a, m = b.attn, b.mlp
        attn = SimpleNamespace(W_Q=a.W_Q, W_K=a.W_K, W_V=a.W_V, W_O=a.W_O, b_Q=z(H, dh), b_K=z(Hkv, dh), b_V=z(Hkv, dh), b_O=z(d),
                               attn_scale=1.0 / float(a.original_component.scaling), rotary_sin=sin[0], rotary_cos=cos[0])
        mlp = SimpleNamespace(W_in=m.W_in, W_gate=m.W_gate, W_out=m.W_out, b_in=z(m.W_in.shape[1]), b_out=z(d), act_fn=m.act_fn)
        norms = [SimpleNamespace(w=ln.w, b=None, eps=float(ln.original_component.variance_epsilon)) for ln in (b.ln1, b.ln2)]
        blocks.append(SimpleNamespace(attn=attn, mlp=mlp, ln1=norms[0], ln2=norms[1]))
    lcfg = SimpleNamespace(n_heads=H, n_key_value_heads=Hkv, d_head=dh, d_model=d, n_layers=int(cfg.n_layers),
                           positional_embedding_type="rotary", normalization_type="RMS", parallel_attn_mlp=False,
                           rotary_dim=dh, rotary_adjacent_pairs=False)
    return SimpleNamespace(cfg=lcfg, blocks=blocks, W_E=model.W_E, W_U=model.W_U, b_U=z(model.W_U.shape[1]))


def bridge_lean_unsupported(model: Any) -> str | None:
    """Why the lean forward (:func:`stages.dream.lean.lean_forward`) cannot run a bridge exactly, from
    the bridge's side (None = it can): an architecture outside :data:`LEAN_BRIDGE_ARCHITECTURES`, or
    weight processing (fold_ln, centring) applied. The hook point is checked by the lean forward."""
    arch = getattr(model.cfg, "architecture", None)
    if arch not in LEAN_BRIDGE_ARCHITECTURES:
        return f"architecture {arch!r} on the bridge backend (covered: {', '.join(LEAN_BRIDGE_ARCHITECTURES)})"
    if any((getattr(model, "_reverie_processing", None) or {}).values()):
        return "processed weights (fold_ln / centring) on the bridge backend"
    if int(model.cfg.n_ctx) > _MAX_ROTARY_POSITIONS:
        log.info("lean forward on the bridge: rotary tables cover the first %d positions", _MAX_ROTARY_POSITIONS)
    return None
