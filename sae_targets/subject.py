"""The :class:`Subject`: a loaded subject model and SAE, checked to fit, with what every stage needs to
know about them (hook point, layer, BOS policy, context size, identities, content hashes). Built by
:func:`sae_targets.loading.load_subject` (from the config) or :func:`sae_targets.loading.subject_from`
(from objects in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Subject:
    """A loaded subject model and SAE, checked to fit each other.

    Attributes:
        model: transformer_lens ``HookedTransformer``, or ``TransformerBridge`` in compatibility mode
            (``model.backend = "bridge"``), in eval mode, gradients off for weights.
        tokenizer: the model's Hugging Face tokenizer (right padding).
        sae: sae-lens ``SAE`` on the model's device.
        hook_name: hook point the SAE reads, e.g. ``blocks.1.hook_resid_pre``.
        layer: block index of the hook; run the model with ``stop_at_layer=layer + 1``.
        prepend_bos: whether prompts start with BOS (from the SAE's metadata).
        context_size: SAE training context length in tokens.
        model_key / sae_key: stable identities ('name' or resolved path; 'release/id' or path).
        neuronpedia_id: Neuronpedia id from the SAE metadata, if any.
        log10_density: per-latent log10 firing frequency, shape [d_sae], float32 (sparsity file), or None.
        model_sha / sae_sha: content hashes (16 hex characters) of the model's and the SAE's files
            (:func:`pipeline.hashing.dir_sha256`; for hub names, the name), part of every cache key.
        model_kwargs: the SAE's ``model_from_pretrained_kwargs`` the model was loaded with.
        normalization: the SAE's ``normalize_activations`` as saved (before any folding).
        norm_scaling_factor: the ``expected_average_only_in`` factor folded into the SAE's weights, or None.
    """

    model: Any
    tokenizer: Any
    sae: Any
    hook_name: str
    layer: int
    prepend_bos: bool
    context_size: int
    model_key: str
    sae_key: str
    neuronpedia_id: str | None = None
    log10_density: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_sha: str | None = None
    sae_sha: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    normalization: str = "none"
    norm_scaling_factor: float | None = None

    @property
    def device(self) -> torch.device:
        return self.model.cfg.device if isinstance(self.model.cfg.device, torch.device) else torch.device(self.model.cfg.device)

    @property
    def backend(self) -> str:
        """'bridge' when the model is a transformer_lens ``TransformerBridge``, else 'hooked'
        (:mod:`sae_targets.backend`)."""
        from reverie.sae_targets.backend import backend_name

        return backend_name(self.model)

    @property
    def stop_at_layer(self) -> int:
        """Blocks the model must run to produce the hook activation: L for ``blocks.L.hook_resid_pre``
        (the residual entering block L is what ``model(..., stop_at_layer=L)`` returns), else L + 1."""
        return self.layer if self.hook_name == f"blocks.{self.layer}.hook_resid_pre" else self.layer + 1

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def n_bos(self) -> int:
        """Leading BOS positions of every sequence fed to the model (1 when the SAE's metadata says
        ``prepend_bos`` and the tokenizer has a BOS token, else 0): the offset of the first corpus
        token of a context, of a scan window and of a dream's fixed prefix (:meth:`with_bos`)."""
        return 1 if self.prepend_bos and self.bos_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.d_vocab)

    def special_ids(self) -> set[int]:
        """Ids of BOS, EOS, PAD, UNK and every added special token (never put in a dream)."""
        tok = self.tokenizer
        ids = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None}
        ids.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
        for t, i in (getattr(tok, "added_tokens_encoder", {}) or {}).items():
            ids.add(int(i))
        return {i for i in ids if 0 <= i < self.vocab_size}

    def unusable_ids(self) -> set[int]:
        """Ids no prompt may hold, dream or random baseline alike: :meth:`special_ids` and the
        padding ids beyond the tokenizer (``d_vocab > len(tokenizer)``, e.g. Pythia's 50,304 vs
        50,277), whose embeddings were never trained."""
        return self.special_ids() | set(range(min(len(self.tokenizer), self.vocab_size), self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS or any special token added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_tokens(self, ids: list[int]) -> list[str]:
        """Display pieces of ``ids``, one string per id (:func:`sae_targets.tokens.token_pieces`):
        each token's own bytes with its spaces kept (no words run together), newlines/tabs shown
        as ``\\n``/``\\t``, partial UTF-8 bytes as ``\\xNN``. Their concatenation, read back
        with :func:`sae_targets.tokens.from_display`, is the decoded text."""
        from reverie.sae_targets.tokens import token_pieces

        return token_pieces(self.tokenizer, ids)

    def with_bos(self, ids: list[int]) -> list[int]:
        """Prepend BOS when the SAE's metadata says ``prepend_bos`` (and the tokenizer has one)."""
        return [self.bos_id, *ids] if self.n_bos else list(ids)
