"""reverie: explain SAE latents by dreaming (EPO; Thompson et al. 2024) and comparing dreams with
the dataset's max-activating examples.

Library use, on a model and SAE already in memory (no store, no config file)::

    import reverie
    result = reverie.dream(model, sae, 1039, seeds=[0, 1])      # HookedTransformer or TransformerBridge + sae-lens SAE
    result.frontier_table()[:3]                                 # most fluent first
    result.plot()                                               # activation vs CE (paper Fig. 3)
    scan = reverie.scan(model, sae, 1039, texts)                # max-activating examples of a list of texts
    reverie.compare(result, scan).table()                       # does a dream dominate the dataset's best window?

The packages: :mod:`reverie.pipeline` (config, store, CLI, orchestration), :mod:`reverie.stages`
(dream — the EPO engine —, scan, compare, explain), :mod:`reverie.sae_targets` (loading,
latent activations, objectives), :mod:`reverie.reports` (HTML). The CLI and the nightly call the
same functions (:func:`reverie.stages.dream.dream_targets`, :func:`reverie.stages.scan.scan_documents`,
:func:`reverie.stages.compare.compare_inputs`); they add only the store around them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["dream", "scan", "compare", "EPOConfig", "DreamConfig", "ScanConfig", "CompareConfig", "DreamResult", "ScanResult",
           "Comparison", "subject_from"]


def __getattr__(name: str) -> Any:
    """Lazy names (importing ``reverie`` stays cheap: torch loads on first use)."""
    if name in ("EPOConfig", "DreamConfig", "ScanConfig", "CompareConfig"):
        from reverie.pipeline import config

        return getattr(config, name)
    if name == "DreamResult":
        from reverie.stages.dream.result import DreamResult

        return DreamResult
    if name == "ScanResult":
        from reverie.stages.scan.rows import ScanResult

        return ScanResult
    if name == "Comparison":
        from reverie.stages.compare.result import Comparison

        return Comparison
    if name == "subject_from":
        from reverie.sae_targets.loading import subject_from

        return subject_from
    raise AttributeError(f"module 'reverie' has no attribute {name!r}")


def dream(model: Any, sae: Any, latents: int | Sequence[int], config: Any = None, *, seeds: Sequence[int] = (0,),
          combine: str | None = None, quantity: str = "pre", reduce: str = "last", tokenizer: Any = None,
          progress: bool | Callable = True) -> Any:
    """Dream (EPO) on latents of an SAE over an already-loaded model.

    Args:
        model: a transformer_lens ``HookedTransformer``, or a ``TransformerBridge`` in compatibility mode (the SAE's hook point must exist in it).
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


def scan(model: Any, sae: Any, latents: int | Sequence[int], texts: Any, config: Any = None, *, n_tokens: int | None = None,
         combine: str | None = None, quantity: str = "pre", reduce: str = "last", text_column: str = "text", tokenizer: Any = None,
         progress: bool = True) -> Any:
    """Scan texts in memory for latents of an SAE over an already-loaded model (no store, no config file).

    The CLI's scan (:func:`reverie.stages.scan.scan_documents`) on ``texts`` instead of a corpus
    file: per latent, the top contexts by the ranking quantity at their max token, density and
    histogram of the post-activation, decile / non-firing / hard-negative samples, every
    full-length window (``n_tokens``, the dreams' length) of the top contexts fed alone after BOS
    with its Pareto frontier (activation vs CE, nats/token), the corpus CE bands of random windows,
    and the random-prompt baseline of each objective (Thompson et al. 2024, Fig. 3 and §3.5).

    Args:
        model / sae / tokenizer: as :func:`dream`.
        latents: latent id(s); with ``combine`` ('lp' | 'sum' | 'min') their combination is scanned
            too (its baseline and searched windows), as :func:`dream` combines them.
        texts: a list of strings, a ``datasets.Dataset`` / ``IterableDataset``, or any iterable of
            strings or rows (the text in ``text_column``); one document each, read up to ``config.max_tokens`` tokens.
        config: :class:`reverie.pipeline.config.ScanConfig` (its ``corpus`` is ignored); default: the
            config file defaults (200,000 tokens, top 64, 1,024 baseline prompts).
        n_tokens: window length in tokens = the dreams' ``n_tokens`` (default: :class:`EPOConfig`'s).
        quantity / reduce: the objective (as :func:`dream`); ``quantity`` also ranks the top examples.
        progress: show a tqdm bar.
    Returns:
        :class:`reverie.stages.scan.rows.ScanResult` (``.examples(latent)``, ``.to_pandas(table)``, ``.to_dict()``).
    Raises:
        TargetError: a latent id outside the SAE, or the SAE does not fit the model.
        ReverieError: the texts hold fewer than 2 windows of ``n_tokens`` tokens.
        TypeError: ``texts`` is one string.
    """
    from reverie.pipeline.config import EPOConfig, ScanConfig, load_config
    from reverie.sae_targets.loading import subject_from
    from reverie.sae_targets.selection import Target
    from reverie.stages.scan.memory import scan_texts

    ids = [int(latents)] if isinstance(latents, int) else [int(i) for i in latents]
    targets = [Target(latents=[i]) for i in ids] + ([Target(latents=ids, combine=combine)] if combine and len(ids) > 1 else [])
    scfg = config if config is not None else ScanConfig()
    cfg = load_config(None, {"targets.quantity": quantity, "targets.reduce": reduce,
                             "dream.n_tokens": int(n_tokens if n_tokens is not None else EPOConfig().n_tokens),
                             **{f"scan.{k}": v for k, v in scfg.model_dump().items() if k != "corpus"}})
    return scan_texts(cfg, subject_from(model, sae, tokenizer), targets, texts, text_column, progress=progress)


def compare(dreams: Any, scan: Any, config: Any = None) -> Any:
    """Compare dream results with a scan result, both in memory (the CLI's compare without the store).

    Per target, the primary verdict is dominance on the activation–CE plane (Thompson et al. 2024,
    Fig. 3): does a dream reach a higher activation than the dataset's best matched-length window
    at a CE no higher than that window's? Plus the fraction of the dataset's Pareto frontier some
    dream dominates, the best of each side at CE ≤ a corpus band and at mean + 2σ, and z-scores
    against random prompts (eq. 5). Definitions: :mod:`reverie.stages.compare`.

    Args:
        dreams: a :class:`DreamResult` from :func:`dream`, or a list of them.
        scan: a :class:`ScanResult` from :func:`scan` over the dreams' latents, with their ``n_tokens``,
            ``quantity`` and ``reduce``.
        config: :class:`reverie.pipeline.config.CompareConfig` (CE limit, CE convention).
    Returns:
        :class:`reverie.stages.compare.result.Comparison` (``.table()``, ``.row(target_id)``,
        ``.metrics(target_id)``, ``.to_pandas()``, ``.to_dict()``).
    Raises:
        ValueError: a dream's objective is not the scan's.
    """
    from reverie.stages.compare import compare_results

    return compare_results(dreams, scan, config)
