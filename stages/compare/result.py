"""The compare stage's result as plain data, and the one call every path compares through.

:func:`compare_inputs` is the compare computation behind the CLI, the nightly
(:func:`stages.compare.store.run_compare`) and the library (:func:`reverie.compare`); it reads no
store and needs no torch. :func:`format_table` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from reverie.pipeline.config import CompareConfig
from reverie.stages.compare.core import TargetInputs, compare_target, summarize


@dataclass
class Comparison:
    """Dreams vs. the dataset's matched-length windows, per target and for the batch.

    Attributes:
        scan_id: the scan compared against.
        rows: one ``comparisons`` row per target (without ``run_id``): dominance columns, the
            CE-limit and mean + 2σ columns, z-scores; ``metrics_json`` holds the rest as JSON text.
            Activations in the objective's units, CE in nats/token.
        summary: the ``compare_summary`` fields (:func:`stages.compare.core.summarize`).
    """

    scan_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def row(self, target_id: str) -> dict[str, Any]:
        """The row of one target ('123' or '12+345').

        Raises:
            KeyError: no such target.
        """
        for r in self.rows:
            if r["target_id"] == str(target_id):
                return r
        raise KeyError(f"no target {target_id!r} in this comparison (targets: {[r['target_id'] for r in self.rows]})")

    def metrics(self, target_id: str) -> dict[str, Any]:
        """The parsed ``metrics_json`` of one target (bands, perplexities, the dataset's best window, notes)."""
        return json.loads(self.row(target_id).get("metrics_json") or "{}")

    def table(self) -> str:
        """The plain-text table the CLI prints (:func:`format_table`)."""
        return format_table(self.rows, self.summary)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data: ``scan_id``, ``rows`` (``metrics_json`` parsed into ``metrics``), ``summary``."""
        rows = [{**{k: v for k, v in r.items() if k != "metrics_json"}, "metrics": json.loads(r.get("metrics_json") or "{}")}
                for r in self.rows]
        return {"scan_id": self.scan_id, "rows": rows, "summary": dict(self.summary)}

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame``, one per target (``metrics_json`` left out; see :meth:`metrics`)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items() if k != "metrics_json"} for r in self.rows])


def compare_inputs(inputs: Sequence[TargetInputs], scan: dict[str, Any], ccfg: CompareConfig, scan_id: str) -> Comparison:
    """Compare every target's dreams with the dataset side (:func:`compare_target`) and summarize.

    Args:
        inputs: per target, from :func:`stages.compare.store.load_inputs` or :func:`stages.compare.inputs.inputs_from_results`.
        scan: the scan's row (CE bands of both conventions, ``window_len``).
        ccfg: ``[compare]`` settings.
    Returns:
        :class:`Comparison`, rows in ``inputs`` order.
    """
    rows = [compare_target(inp, ccfg, scan) for inp in inputs]
    return Comparison(scan_id=scan_id, rows=rows, summary=summarize(rows, scan))


def _f(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def format_table(rows: Sequence[dict[str, Any]], summary: dict[str, Any] | None, ce_limit: float | str | None = None) -> str:
    """The comparison table as plain text: the dominance headline first, then secondary columns.

    One line per target: the dataset's best matched-length window (activation, CE, perplexity),
    the best dream at CE ≤ that CE, whether a dream dominates it, the dominated fraction of the
    dataset frontier, then the maxima and the mean + 2σ column. Combinations are listed apart
    and left out of the batch line. Numbers to 3 significant digits; CE in nats/token.
    """
    summary = summary or {}
    head = (f"{'target':>10} {'CE':>4} {'data best':>9} {'at CE':>6} {'(ppl)':>7} {'dream@CE':>8} {'dominates':>9} {'front.dom':>9} "
            f"{'dream max':>9} {'data max':>8} {'in ctx':>7} {'dream≤thr':>9} {'data≤thr':>8}  in-distribution state")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: bool(r.get("is_combination"))):
        m = json.loads(r.get("metrics_json") or "{}")
        lines.append(
            f"{r['target_id']:>10} {r.get('ce_convention') or '—':>4} {_f(r.get('data_best_act')):>9} {_f(r.get('data_best_ce')):>6} "
            f"{_f(m.get('data_best_ce_perplexity'), '.0f'):>7} {_f(r.get('dream_at_data_ce')):>8} {_f(r.get('dominates')):>9} "
            f"{_f(r.get('frontier_dominated'), '.0%'):>9} {_f(r['dream_max']):>9} {_f(r['data_max']):>8} {_f(r.get('data_max_in_context')):>7} "
            f"{_f(r['dream_best_in_dist']):>9} {_f(r['data_best_in_dist']):>8}  {r.get('in_dist_state') or '—'}"
            + ("   [combination: combined value, not in the batch line]" if r.get("is_combination") else ""))
    conv = summary.get("ce_convention")
    conv_txt = {"rest": "CE without the first token", "all": "CE over all n tokens after BOS"}.get(conv, f"CE convention {conv}")
    lines.append("")
    lines.append(f"verdict on {conv_txt} (nats/token); windows and dreams of the same length, fed alone after BOS.")
    lines.append(f"a dream dominates the dataset's best window on {_f(summary.get('n_dominates'), 'd')} of "
                 f"{_f(summary.get('n_dominance_known'), 'd')} single latents ({_f(summary.get('frac_dominates'), '.0%')}); "
                 f"dream max > dataset max on {_f(summary.get('frac_beats'), '.0%')}; at CE ≤ mean + 2σ "
                 f"({_f(summary.get('in_dist_threshold'))}) on {_f(summary.get('frac_beats_in_dist'), '.0%')} of those where both sides have a window there.")
    lines.append(f"corpus window CE: 10th percentile {_f(summary.get('ce_p10'))}, median {_f(summary.get('ce_p50'))}, "
                 f"mean {_f(summary.get('ce_mean'))} ± {_f(summary.get('ce_std'))} nats/token")
    return "\n".join(lines)
