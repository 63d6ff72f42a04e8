"""Choose the latents to explain: explicit ids, or N random alive latents from a seed."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import torch

from reverie.pipeline.config import CorpusConfig, TargetsConfig
from reverie.pipeline.corpus import iter_documents
from reverie.pipeline.errors import TargetError
from reverie.sae_targets.activations import latent_activations
from reverie.sae_targets.contexts import hook_activations, iter_contexts, pad_batch
from reverie.sae_targets.loading import Subject, check_latents
from reverie.sae_targets.spec import Target  # noqa: F401 - defined torch-free, re-exported


def default_seed() -> int:
    """Today's date (UTC) as YYYYMMDD: the nightly's seed when none is given."""
    return int(dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d"))


def estimate_log10_density(subject: Subject, corpus: CorpusConfig, n_tokens: int, batch_size: int = 16) -> torch.Tensor:
    """log10 firing frequency of every latent from a short scan of the corpus.

    Counts post-activation > 0 over the first ``n_tokens`` corpus tokens (BOS positions
    excluded). Latents that never fire get log10 density -10 (frequency clipped at 1e-10).

    Returns:
        float32 [d_sae].
    """
    fired = torch.zeros(subject.d_sae, dtype=torch.float64)
    seen = 0
    ctx_iter = iter_contexts(subject, iter_documents(corpus), subject.context_size)
    pad = subject.tokenizer.pad_token_id or 0
    while seen < n_tokens:
        batch = list(itertools.islice(ctx_iter, batch_size))
        if not batch:
            break
        tokens, mask = pad_batch(batch, pad)
        mask[:, : subject.n_bos] = False
        x = hook_activations(subject, tokens)
        post = latent_activations(subject.sae, x).post
        m = mask.to(post.device)
        fired += ((post > 0) & m[..., None]).sum(dim=(0, 1)).double().cpu()
        seen += int(m.sum())
    if seen == 0:
        raise TargetError("the corpus gave no tokens to estimate latent densities; check scan.corpus")
    return torch.log10((fired / seen).clamp_min(1e-10)).float()


def log10_densities(subject: Subject, tcfg: TargetsConfig, corpus: CorpusConfig) -> tuple[torch.Tensor, str]:
    """Per-latent log10 density, float32 [d_sae], and its source ('sparsity.safetensors' | 'corpus scan')."""
    if subject.log10_density is not None:
        if subject.log10_density.numel() != subject.d_sae:
            raise TargetError(f"sparsity file has {subject.log10_density.numel()} entries but the SAE has d_sae = {subject.d_sae}; delete or fix it")
        return subject.log10_density, "sparsity.safetensors"
    return estimate_log10_density(subject, corpus, tcfg.density_scan_tokens), "corpus scan"


def random_alive_latents(log10_density: torch.Tensor, n: int, seed: int, floor: float, ceiling: float,
                         explained: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Draw ``n`` distinct latents uniformly among those with ``floor < log10 density < ceiling``.

    Deterministic for a given seed, density vector and ``explained`` set. Latents in ``explained``
    (explained on earlier nights) are drawn only when fewer than ``n`` alive latents are new: all
    new ones first, the rest uniformly among the explained ones. With ``explained`` empty the draw
    is exactly the plain uniform one. Returns ids sorted ascending.

    Raises:
        TargetError: fewer than ``n`` latents are alive within the bounds.
    """
    dens = log10_density.double().numpy()
    alive = np.flatnonzero((dens > floor) & (dens < ceiling))
    if len(alive) < n:
        raise TargetError(
            f"only {len(alive)} latents have {floor} < log10 density < {ceiling}, fewer than the {n} requested; "
            "lower targets.log10_density_min, raise targets.log10_density_max, or ask for fewer"
        )
    rng = np.random.default_rng(seed)
    fresh = np.array([i for i in alive if int(i) not in explained], dtype=alive.dtype) if explained else alive
    if len(fresh) >= n:
        return sorted(int(i) for i in rng.choice(fresh, size=n, replace=False))
    old = np.array([i for i in alive if int(i) in explained], dtype=alive.dtype)
    return sorted([int(i) for i in fresh] + [int(i) for i in rng.choice(old, size=n - len(fresh), replace=False)])


def select_targets(subject: Subject, tcfg: TargetsConfig, corpus: CorpusConfig,
                   explained: set[int] | frozenset[int] = frozenset()) -> tuple[list[Target], str]:
    """The run's targets: explicit or random single latents, then the configured combinations.

    ``explained``: latents explained on earlier nights; the random draw takes them only when too
    few new alive latents remain (:func:`random_alive_latents`). Explicit latents are never affected.

    Returns:
        ``(targets, density_source)``.
    Raises:
        TargetError: a latent id out of range, or too few alive latents.
    """
    explicit = list(dict.fromkeys(tcfg.latents))
    if not explicit and not tcfg.combinations and tcfg.n_random <= 0:
        raise TargetError("nothing to explain: targets.latents and targets.combinations are empty and targets.n_random = 0; "
                          "set targets.n_random >= 1 (or --n 1), or list latents (targets.latents / --latent)")
    check_latents(explicit, subject.d_sae)
    for combo in tcfg.combinations:
        check_latents(combo, subject.d_sae)
        if len(set(combo)) != len(combo):
            raise TargetError(f"targets.combinations entry {combo} repeats a latent; a combination needs distinct latents")
        if len(combo) < 2:
            raise TargetError(f"targets.combinations entry {combo} has fewer than 2 latents; put single latents in targets.latents")
    dens, source = log10_densities(subject, tcfg, corpus)
    if explicit:
        ids = explicit
    else:
        seed = default_seed() if tcfg.seed is None else tcfg.seed
        ids = random_alive_latents(dens, tcfg.n_random, seed, tcfg.log10_density_min, tcfg.log10_density_max, explained=explained)
    d = dens.tolist()
    targets = [Target(latents=[i], log10_density=[d[i]]) for i in ids]
    targets += [Target(latents=list(c), combine=tcfg.combine, log10_density=[d[i] for i in c]) for c in tcfg.combinations]
    return targets, source
