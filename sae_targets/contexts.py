"""Documents → model contexts: the tokenization every corpus pass (density estimate, scan) shares."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from reverie.sae_targets.loading import Subject


@dataclass
class Context:
    """One model context.

    Attributes:
        doc_idx: index of the source document in the stream.
        start: position of the context's first corpus token in the document's token list.
        ids: token ids fed to the model (BOS first when the SAE prepends it), length ≤ context size.
    """

    doc_idx: int
    start: int
    ids: list[int]


def iter_contexts(subject: Subject, docs: Iterable[str], context_size: int, min_tokens: int = 2, doc_offset: int = 0,
                  tokenize_batch: int = 64) -> Iterator[Context]:
    """Split each document into consecutive contexts of at most ``context_size`` tokens.

    Each context starts with BOS when ``subject.prepend_bos`` (so it holds ``context_size - 1``
    corpus tokens); contexts never span two documents. Chunks with fewer than ``min_tokens``
    corpus tokens are dropped. Documents are tokenized ``tokenize_batch`` at a time (one call
    into the fast tokenizer per batch), lazily, so streaming stays bounded.
    """
    body = context_size - subject.n_bos
    numbered = enumerate(docs, start=doc_offset)
    while chunk := list(itertools.islice(numbered, tokenize_batch)):
        encoded = subject.tokenizer([t for _, t in chunk], add_special_tokens=False)["input_ids"]
        for (d, _), ids in zip(chunk, encoded):
            for s in range(0, len(ids), body):
                piece = ids[s : s + body]
                if len(piece) >= min_tokens:
                    yield Context(doc_idx=d, start=s, ids=subject.with_bos(piece))


def pad_batch(contexts: list[Context], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad contexts into a batch.

    Returns:
        ``(tokens, mask)``: int64 [B, T] ids and bool [B, T] (True on real tokens).
    """
    T = max(len(c.ids) for c in contexts)
    tokens = torch.full((len(contexts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), T), dtype=torch.bool)
    for i, c in enumerate(contexts):
        tokens[i, : len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
        mask[i, : len(c.ids)] = True
    return tokens, mask


def hook_activations(subject: Subject, tokens: torch.Tensor) -> torch.Tensor:
    """Run the model only as far as the hook point needs and return the hook activation.

    For ``blocks.L.hook_resid_pre`` the residual stream entering block L is what
    ``model(tokens, stop_at_layer=L)`` returns, so blocks L.. never run; any other hook in
    block L runs blocks 0..L with a capturing hook.

    Args:
        tokens: int64 [B, T] on any device.
    Returns:
        [B, T, d_in] float activations at ``subject.hook_name`` (no gradient).
    """
    tokens = tokens.to(subject.device)
    with torch.no_grad():
        if subject.stop_at_layer == subject.layer:
            return subject.model(tokens, stop_at_layer=subject.layer)
        store: dict[str, torch.Tensor] = {}

        def grab(act, hook):
            store["x"] = act
            return act

        subject.model.run_with_hooks(tokens, stop_at_layer=subject.stop_at_layer, fwd_hooks=[(subject.hook_name, grab)])
    return store["x"]
