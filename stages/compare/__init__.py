"""The compare stage: dreams vs. max-activating dataset windows, per target and per batch.

No torch anywhere in this package (it reads rows): :mod:`~stages.compare.core` (the verdicts),
:mod:`~stages.compare.inputs` (what each side is, from stored rows or results in memory),
:mod:`~stages.compare.result` (:class:`Comparison`, :func:`compare_inputs` — the one compare call
of the CLI, the nightly and :func:`reverie.compare`), :mod:`~stages.compare.store` (DuckDB reads
and writes, :func:`run_compare`).

The primary verdict is *dominance* on the activation–CE plane, as in Thompson et al. 2024,
Fig. 3 (§3.3): a dream dominates a dataset window when its activation is higher and its CE is
not higher, both being windows of the same length (the dream's) fed alone after BOS. Per target:

* the dataset's best window: the highest activation among the scan's searched matched-length
  windows (every full-length window of the top contexts, ``scan_windows``), with its CE;
* the headline: the best dream activation at CE ≤ that window's CE, next to its activation;
  ``dominates`` is TRUE when that dream's activation is higher;
* the fraction of the dataset's own Pareto frontier that some dream dominates;
* secondary columns: the best of each side at CE ≤ ``compare.ce_limit`` (a corpus band by
  default, the 10th percentile) and at CE ≤ the corpus mean + 2σ ("in distribution");
  z-scores (eq. 5); frontier prompts above the dataset max; attribution overlap.

States that cannot be decided are NULL, never TRUE: no dreams, no dataset windows, and, for the
mean + 2σ column, "no dream in distribution" and "no dataset window under the threshold";
``verdict`` / ``in_dist_state`` say which in words. Only dreams of the scan's window length are
compared (others are counted and noted).

CE convention (``compare.ce_convention``, stored per row): 'rest' = mean over tokens 2..n (the
first token unscored, dreamy's convention), 'all' = over all n tokens after BOS. Both are shown;
'rest' falls back to 'all' when the dreams have no stored ``ce_rest``.

Combinations (``combine`` not NULL): the combined objective is compared as a curiosity only;
the page compares each member latent's own activation with that member's own dataset max, and
batch statistics use single-latent targets only.
"""

from __future__ import annotations

from typing import Any

from reverie.pipeline.config import CompareConfig
from reverie.stages.compare.core import (  # noqa: F401 - the package's names
    DREAM_FIELDS, S_BEATS, S_LOSES, S_NO_DATA_IN, S_NO_DREAM_IN, S_NO_THRESHOLD, V_DOMINATES, V_NO_DATA, V_NO_DREAMS,
    V_NO_FLUENT_DREAM, V_NOT_DOMINATED, TargetInputs, attribution_top_tokens, band_limits, compare_target, dominance, dominates,
    in_dist_verdict, member_comparison, pareto_frontier, resolve_ce_limit, summarize,
)
from reverie.stages.compare.inputs import inputs_from_results, target_inputs  # noqa: F401
from reverie.stages.compare.result import Comparison, compare_inputs, format_table  # noqa: F401
from reverie.stages.compare.store import load_inputs, run_compare, write_compare  # noqa: F401


def compare_results(dreams: Any, scan: Any, config: CompareConfig | None = None) -> Comparison:
    """Compare dream results with a scan result, both in memory (the library's :func:`reverie.compare`).

    Args:
        dreams: a :class:`stages.dream.result.DreamResult` or a list of them (results of one target are pooled).
        scan: a :class:`stages.scan.rows.ScanResult` that covers the dreams' latents, scanned with the
            dreams' window length (``dream.n_tokens``) and objective quantity / reduction.
        config: :class:`pipeline.config.CompareConfig` (default: ``ce_limit = 'p10'``, ``ce_convention = 'rest'``).
    Returns:
        :class:`Comparison` (single latents first, by latent id).
    Raises:
        ValueError: a dream's objective is not the scan's (quantity or reduction differ).
    """
    results = list(dreams) if isinstance(dreams, (list, tuple)) else [dreams]
    return compare_inputs(inputs_from_results(results, scan), scan.scan_row, config or CompareConfig(), scan.scan_id)
