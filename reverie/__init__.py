"""reverie: explain SAE latents by dreaming (EPO; Thompson et al. 2024) and comparing dreams with
the dataset's max-activating examples.

Library use, on a model and SAE already in memory (no store, no config file)::

    import reverie
    result = reverie.dream(model, sae, 1039, seeds=[0, 1])      # HookedTransformer + sae-lens SAE
    result.frontier_table()[:3]                                 # most fluent first
    result.plot()                                               # activation vs CE (paper Fig. 3)

The packages: :mod:`reverie.pipeline` (config, store, CLI, orchestration), :mod:`reverie.stages`
(dream — the EPO engine —, scan, compare, explain), :mod:`reverie.sae_targets` (loading,
latent activations, objectives), :mod:`reverie.reports` (HTML). The CLI and the nightly call the
same functions (:func:`reverie.stages.dream.dream_targets`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["dream", "EPOConfig", "DreamConfig", "DreamResult", "subject_from"]


def __getattr__(name: str) -> Any:
    """Lazy names (importing ``reverie`` stays cheap: torch loads on first use)."""
    if name in ("EPOConfig", "DreamConfig"):
        from reverie.pipeline import config

        return getattr(config, name)
    if name == "DreamResult":
        from reverie.stages.dream.result import DreamResult

        return DreamResult
    if name == "subject_from":
        from reverie.sae_targets.loading import subject_from

        return subject_from
    raise AttributeError(f"module 'reverie' has no attribute {name!r}")


def dream(model: Any, sae: Any, latents: int | Sequence[int], config: Any = None, *, seeds: Sequence[int] = (0,),
          combine: str | None = None, quantity: str = "pre", reduce: str = "last", tokenizer: Any = None,
          progress: bool | Callable = True) -> Any:
    """Dream (EPO) on latents of an SAE over an already-loaded model.

    Args:
        model: a transformer_lens ``HookedTransformer`` (the SAE's hook point must exist in it).
        sae: a sae-lens ``SAE`` (or an object shaped like one: ``cfg.metadata.hook_name``,
            ``W_enc``, ``encode``).
        latents: one latent id → its result; several ids → one result per latent, dreamed as one
            batched search; several ids with ``combine`` ('lp' | 'sum' | 'min') → one combined target.
        config: :class:`reverie.pipeline.config.DreamConfig` (or ``EPOConfig``); default: the
            paper's Table 1 settings with ``objective_scale = 'z'``.
        seeds: EPO seeds; their frontiers merge into one result per target.
        quantity / reduce: what the objective reads ('pre' | 'post' | 'projection'; 'last' | 'max').
        tokenizer: defaults to ``model.tokenizer``.
        progress: show a tqdm bar (True), nothing (False), or a callable taking ``IterationStats``.
    Returns:
        :class:`reverie.stages.dream.result.DreamResult` (merged over seeds), or a list of them
        when several latents are dreamed separately.
    Raises:
        TargetError: a latent id outside the SAE, or the SAE does not fit the model.
        ConfigError: see :func:`reverie.stages.dream.dream_targets`.
    """
    from reverie.pipeline.config import DreamConfig, load_config
    from reverie.sae_targets.loading import subject_from
    from reverie.sae_targets.selection import Target
    from reverie.stages.dream import dream_targets, merge_results

    ids = [int(latents)] if isinstance(latents, int) else [int(i) for i in latents]
    targets = [Target(latents=ids, combine=combine)] if combine else [Target(latents=[i]) for i in ids]
    dcfg = config if config is not None else DreamConfig()
    cfg = load_config(None, {"dream.seeds": [int(s) for s in seeds], "targets.quantity": quantity, "targets.reduce": reduce,
                             **{f"dream.{k}": v for k, v in dcfg.model_dump().items() if k != "seeds"}})   # config file defaults, no paths used
    subject = subject_from(model, sae, tokenizer)
    bar = None
    cb = progress if callable(progress) else None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.dream.iterations, desc=f"dream {len(targets)} target(s)", unit="it")

        def cb(s):  # noqa: ANN001
            if s.iteration < bar.n:
                bar.reset()
            bar.update(s.iteration - bar.n)
    try:
        per_target = dream_targets(cfg, subject, targets, progress=cb)
    finally:
        if bar is not None:
            bar.close()
    merged = [merge_results(rs) for rs in per_target]
    return merged[0] if (isinstance(latents, int) or combine) else merged
