"""The compare stage's verdicts: pure functions of plain rows (no store, no torch).

:func:`compare_target` turns one target's :class:`TargetInputs` into one ``comparisons`` row
(dominance on the activation–CE plane, Thompson et al. 2024 Fig. 3 / §3.3; the secondary CE-limit
and mean + 2σ columns; z-scores, eq. 5); :func:`summarize` gives the batch line. The module
docstring of :mod:`stages.compare` states the definitions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from reverie.pipeline.config import CompareConfig
from reverie.stages.pareto import pareto_frontier

DREAM_FIELDS = ("dream_max", "dream_best_ce_limit", "dream_best_in_dist", "dream_z", "n_beating", "attribution_overlap")
#: dominance verdict states (``comparisons.verdict``)
V_DOMINATES = "a dream dominates the dataset's best window"
V_NOT_DOMINATED = "no dream dominates the dataset's best window"
V_NO_FLUENT_DREAM = "no dream is as fluent as the dataset's best window"
V_NO_DREAMS = "no dreams"
V_NO_DATA = "no matched-length dataset windows"
#: states of the mean + 2σ column (``comparisons.in_dist_state``)
S_BEATS, S_LOSES = "dream beats the dataset in distribution", "dataset wins in distribution"
S_NO_DREAM_IN, S_NO_DATA_IN = "no dream in distribution", "no dataset window under the threshold"
S_NO_THRESHOLD = "no corpus threshold"


@dataclass
class TargetInputs:
    """Everything compare needs for one target (plain data).

    Attributes:
        dreams: dicts with ``activation``, ``ce``, ``ce_rest`` (nats/token; ``ce_rest`` None when not stored),
            ``text``, ``dream_id``, ``idx``, ``latent_acts`` (combinations), all seeds merged, matched length only.
        attributions: dicts with ``dream_id``, ``idx``, ``position``, ``token``, ``drop_best``, ``drop_worst``.
        data: matched-length dataset windows as dicts with ``window_act``, ``window_ce``, ``window_ce_rest``.
        data_max_tokens: tokens at the max of the target's latents' top examples.
        baseline: random-prompt ``{"mean", "std", "max", "n", "objective_key"}`` or None.
        members: combinations: per member latent ``{"latent", "window_max", "max_act"}`` from the scan.
        data_max_in_context: single latent: the scan's max at the max token, in context.
        n_unmatched_dreams: dream prompts dropped because their length is not the scan's window length.
    """

    target_id: str
    latents: list[int]
    combine: str | None
    objective_key: str
    dreams: list[dict[str, Any]] = field(default_factory=list)
    n_seeds: int = 0
    attributions: list[dict[str, Any]] = field(default_factory=list)
    data: list[dict[str, Any]] = field(default_factory=list)
    data_source: str = ""
    data_max_tokens: list[str] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    members: list[dict[str, Any]] = field(default_factory=list)
    data_max_in_context: float | None = None
    n_unmatched_dreams: int = 0


def _best(values: Sequence[tuple[float | None, float | None]], limit: float | None = None) -> float | None:
    """Max activation among ``(activation, ce)`` with CE ≤ ``limit`` (None: no limit); None if none qualifies."""
    acts = [a for a, c in values if a is not None and math.isfinite(a) and (limit is None or (c is not None and c <= limit))]
    return max(acts) if acts else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _z(a: float | None, base: dict[str, Any] | None) -> float | None:
    if a is None or base is None or not base.get("std") or base["std"] <= 0:
        return None
    return (a - base["mean"]) / base["std"]


def _norm(tok: str) -> str:
    return tok.strip().lower()


def attribution_top_tokens(attributions: Sequence[dict[str, Any]], n: int) -> list[str]:
    """The ``n`` most important tokens of each attributed prompt (largest ``drop_best``), normalized, distinct."""
    by_prompt: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for a in attributions:
        by_prompt.setdefault((a["dream_id"], int(a["idx"])), []).append(a)
    out: dict[str, None] = {}
    for key in sorted(by_prompt):
        rows = sorted(by_prompt[key], key=lambda a: (-float(a["drop_best"]), int(a["position"])))
        for a in rows[:n]:
            t = _norm(a["token"])
            if t:
                out[t] = None
    return list(out)


def _ppl(ce: float | None) -> float | None:
    """Perplexity exp(CE) of a CE in nats/token (None stays None; overflow → inf)."""
    if ce is None or not math.isfinite(ce):
        return None
    return math.exp(ce) if ce < 700 else math.inf


def _argbest(points: Sequence[tuple[float | None, float | None]], limit: float | None = None) -> int | None:
    """Index of the highest activation among ``(activation, ce)`` with CE ≤ ``limit`` (None: any CE, CE may be unknown);
    ties: lower CE, then earlier index. None if none qualifies."""
    best, key = None, None
    for i, (a, c) in enumerate(points):
        if a is None or not math.isfinite(a):
            continue
        if limit is not None and (c is None or not math.isfinite(c) or c > limit):
            continue
        k = (-a, c if c is not None and math.isfinite(c) else math.inf, i)
        if key is None or k < key:
            best, key = i, k
    return best


def dominates(dream: tuple[float, float], window: tuple[float, float]) -> bool:
    """Paper Fig. 3 dominance: the dream's activation is higher and its CE is not higher.

    Args:
        dream, window: ``(activation, CE in nats/token)`` of two windows of the same length fed alone after BOS.
    """
    return dream[0] > window[0] and dream[1] <= window[1]


def dominance(dreams: Sequence[tuple[float, float]], data: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The dominance verdict of one target on the activation–CE plane (issue 11 §1; paper Fig. 3).

    Args:
        dreams: ``(activation, CE)`` of the dream prompts (nats/token, one CE convention).
        data: ``(activation, CE)`` of the dataset's matched-length windows fed alone (same convention).
    Returns:
        ``{"data_best_act", "data_best_ce"}`` — the dataset's best window (highest activation; ties: lower CE);
        ``{"dream_at_data_ce", "dream_at_data_ce_ce"}`` — the best dream at CE ≤ ``data_best_ce``;
        ``"dominates"`` — TRUE when that dream's activation is higher, FALSE when it is not or no dream
        is that fluent, None (undecidable) without dreams or without dataset windows;
        ``"frontier_dominated"`` — fraction of the dataset's Pareto frontier dominated by some dream
        (None without dreams or data); ``"n_data_frontier"``; ``"verdict"`` — the state in words.
    """
    dpts = [(a, c) for a, c in dreams if a is not None and c is not None and math.isfinite(a) and math.isfinite(c)]
    wpts = [(a, c) for a, c in data if a is not None and c is not None and math.isfinite(a) and math.isfinite(c)]
    out: dict[str, Any] = {"data_best_act": None, "data_best_ce": None, "dream_at_data_ce": None, "dream_at_data_ce_ce": None,
                           "dominates": None, "frontier_dominated": None, "n_data_frontier": None, "verdict": None}
    front = [wpts[i] for i in pareto_frontier(wpts)]
    out["n_data_frontier"] = len(front) if wpts else None
    if wpts:
        i = _argbest(wpts)
        out["data_best_act"], out["data_best_ce"] = wpts[i]
    if not wpts:
        out["verdict"] = V_NO_DATA
        return out
    if not dpts:
        out["verdict"] = V_NO_DREAMS
        return out
    j = _argbest(dpts, out["data_best_ce"])
    if j is None:
        out["dominates"], out["verdict"] = False, V_NO_FLUENT_DREAM
    else:
        out["dream_at_data_ce"], out["dream_at_data_ce_ce"] = dpts[j]
        out["dominates"] = dominates(dpts[j], (out["data_best_act"], out["data_best_ce"]))
        out["verdict"] = V_DOMINATES if out["dominates"] else V_NOT_DOMINATED
    out["frontier_dominated"] = sum(any(dominates(d, w) for d in dpts) for w in front) / len(front)
    return out


def in_dist_verdict(dreams: Sequence[tuple[float, float]], data: Sequence[tuple[float, float]], threshold: float | None
                    ) -> tuple[float | None, float | None, bool | None, str]:
    """The secondary mean + 2σ column: best of each side at CE ≤ ``threshold`` and who wins.

    Returns:
        ``(dream best, data best, beats, state)``; ``beats`` is None (never TRUE) when there is no
        threshold, no dataset window under it, or no dream under it; ``state`` says which.
    """
    if threshold is None:
        return None, None, None, S_NO_THRESHOLD
    d, w = _best(dreams, threshold), _best(data, threshold)
    if w is None:
        return d, w, None, S_NO_DATA_IN
    if d is None:
        return d, w, None, S_NO_DREAM_IN
    return d, w, d > w, S_BEATS if d > w else S_LOSES


def band_limits(scan: dict[str, Any], convention: str) -> dict[str, float | None]:
    """The corpus CE bands of a scan row under a CE convention: ``{"p10", "p50", "in_dist", "mean", "std"}``.

    Args:
        scan: a ``scans`` row (migration 0007 columns may be absent on older scans → None).
        convention: 'all' (``ce_*`` columns) or 'rest' (``ce_rest_*`` columns).
    """
    if convention == "rest":
        return {"p10": scan.get("ce_rest_p10"), "p50": scan.get("ce_rest_p50"), "in_dist": scan.get("ce_rest_in_dist_threshold"),
                "mean": scan.get("ce_rest_mean"), "std": scan.get("ce_rest_std")}
    return {"p10": scan.get("ce_p10"), "p50": scan.get("ce_p50"), "in_dist": scan.get("in_dist_threshold"),
            "mean": scan.get("ce_mean"), "std": scan.get("ce_std")}


def resolve_ce_limit(ce_limit: float | str, bands: dict[str, float | None]) -> float | None:
    """``compare.ce_limit`` as nats/token: a band name ('p10', 'p50', 'in_dist') looked up in ``bands``, or the number."""
    if isinstance(ce_limit, str):
        return bands.get(ce_limit)
    return float(ce_limit)


def compare_target(inp: TargetInputs, ccfg: CompareConfig, scan: dict[str, Any] | float | None) -> dict[str, Any]:
    """One ``comparisons`` row (without run/scan ids) from a target's inputs.

    Args:
        scan: the ``scans`` row (CE bands of both conventions); a bare number is taken as the
            in-distribution threshold of convention 'all' (older callers).
    Returns:
        the row: dominance columns (:func:`dominance`), secondary columns at ``compare.ce_limit``
        and at mean + 2σ (:func:`in_dist_verdict`), z-scores, and ``metrics_json`` (bands with
        perplexities, both CE conventions, per-member numbers for combinations, notes). Dream
        fields are None without dreams; ratio None when the dataset maximum is ≤ 0 or for a
        combination (its combined value is compared per member instead).
    """
    if not isinstance(scan, dict):
        scan = {"in_dist_threshold": scan}
    notes = list(inp.notes)
    conv = ccfg.ce_convention
    if conv == "rest" and inp.dreams and any(d.get("ce_rest") is None for d in inp.dreams):
        conv = "all"
        notes.append("dreams have no stored ce_rest (CE without the first token): verdicts use CE over all n tokens")
    if conv == "rest" and inp.data and any(d.get("window_ce_rest") is None for d in inp.data):
        conv = "all"
        notes.append("dataset windows have no stored ce_rest: verdicts use CE over all n tokens")
    dk, wk = ("ce_rest", "window_ce_rest") if conv == "rest" else ("ce", "window_ce")
    dpts = [(float(d["activation"]), None if d.get(dk) is None else float(d[dk])) for d in inp.dreams]
    data = [(d["window_act"], d.get(wk)) for d in inp.data]
    bands = band_limits(scan, conv)
    in_dist = bands["in_dist"]
    ce_limit = resolve_ce_limit(ccfg.ce_limit, bands)
    dom = dominance(dpts, data)
    data_max = dom["data_best_act"]
    data_lim = _best(data, ce_limit) if ce_limit is not None else None
    d_in, data_in, beats_in, in_state = in_dist_verdict(dpts, data, in_dist)
    is_combo = inp.combine is not None or len(inp.latents) > 1
    row: dict[str, Any] = {"target_id": inp.target_id, "data_max": data_max, "data_best_ce_limit": data_lim,
                           "data_best_in_dist": data_in, "data_z": _z(data_max, inp.baseline), "ce_convention": conv,
                           **{k: dom[k] for k in ("data_best_act", "data_best_ce", "dream_at_data_ce", "dream_at_data_ce_ce",
                                                  "dominates", "frontier_dominated", "n_data_frontier", "verdict")},
                           "in_dist_state": in_state, "data_max_in_context": inp.data_max_in_context, "is_combination": is_combo}
    band_rows = []
    for name in ("p10", "p50", "in_dist"):
        lim = bands[name]
        band_rows.append({"band": name, "limit": lim, "perplexity": _ppl(lim),
                          "dream_best": _best(dpts, lim) if lim is not None else None,
                          "data_best": _best(data, lim) if lim is not None else None})
    metrics: dict[str, Any] = {
        "latents": inp.latents, "combine": inp.combine, "objective_key": inp.objective_key, "ce_limit": ce_limit,
        "ce_limit_setting": ccfg.ce_limit, "ce_convention": conv, "ce_convention_setting": ccfg.ce_convention,
        "in_dist_threshold": in_dist, "ce_mean": bands["mean"], "ce_std": bands["std"], "corpus_median_ce": bands["p50"],
        "bands": band_rows, "data_source": inp.data_source, "n_data_windows": len(data),
        "baseline": inp.baseline, "n_seeds": inp.n_seeds, "n_prompts": len(dpts), "n_unmatched_dreams": inp.n_unmatched_dreams,
        "data_best_ce_perplexity": _ppl(dom["data_best_ce"]), "dream_at_data_ce_perplexity": _ppl(dom["dream_at_data_ce_ce"]),
        "data_max_in_context": inp.data_max_in_context,
    }
    if inp.data:
        bi = _argbest(data)
        if bi is not None:
            w = inp.data[bi]
            metrics["data_best_window"] = {"ce": w.get("window_ce"), "ce_rest": w.get("window_ce_rest"), "act": w.get("window_act"),
                                           "tokens": w.get("tokens"), "context_idx": w.get("context_idx"), "end_pos": w.get("end_pos")}
    if not inp.data:
        notes.append("no matched-length dataset windows for this target in the scan")
    if data_max is not None and data_max <= 0:
        notes.append("dataset maximum ≤ 0: ratio undefined")
    if inp.n_unmatched_dreams:
        notes.append(f"{inp.n_unmatched_dreams} dream prompts of another length than the scan's windows were not compared")
    if not dpts:
        notes.append("no dreams for this target in this run")
        row.update({k: None for k in DREAM_FIELDS})
        row.update({"ratio": None, "beats_data": None, "beats_data_in_dist": None})
    else:
        front = pareto_frontier(dpts)
        dream_max = max(a for a, _ in dpts)
        dream_lim = _best(dpts, ce_limit) if ce_limit is not None else None
        top_tokens = attribution_top_tokens(inp.attributions, ccfg.attribution_top_tokens)
        data_tokens = {_norm(t) for t in inp.data_max_tokens if _norm(t)}
        overlap = (sum(t in data_tokens for t in top_tokens) / len(top_tokens)) if top_tokens and data_tokens else None
        row.update({
            "dream_max": dream_max, "dream_best_ce_limit": dream_lim, "dream_best_in_dist": d_in,
            "ratio": None if is_combo else _ratio(dream_max, data_max), "dream_z": _z(dream_max, inp.baseline),
            "n_beating": sum(dpts[i][0] > data_max for i in front) if data_max is not None else None,
            "attribution_overlap": overlap,
            "beats_data": None if data_max is None else dream_max > data_max,
            "beats_data_in_dist": beats_in,
        })
        best = max(range(len(dpts)), key=lambda i: dpts[i][0])
        metrics.update({
            "n_frontier": len(front), "n_beating_all_prompts": sum(a > data_max for a, _ in dpts) if data_max is not None else None,
            "dream_max_ce": dpts[best][1], "dream_max_ce_all": inp.dreams[best].get("ce"), "dream_max_ce_rest": inp.dreams[best].get("ce_rest"),
            "dream_max_perplexity": _ppl(dpts[best][1]), "dream_max_text": inp.dreams[best].get("text"),
            "dream_z_ce_limit": _z(dream_lim, inp.baseline), "dream_z_in_dist": _z(d_in, inp.baseline),
            "attribution_tokens": top_tokens, "ratio_ce_limit": _ratio(dream_lim, data_lim), "ratio_in_dist": _ratio(d_in, data_in),
        })
        if is_combo:
            metrics["ratio_combined"] = _ratio(dream_max, data_max)
        if not inp.attributions:
            notes.append("no token attributions: overlap undefined")
    if is_combo:
        metrics["members"] = member_comparison(inp)
    metrics.update({"data_z_ce_limit": _z(data_lim, inp.baseline), "data_z_in_dist": _z(data_in, inp.baseline),
                    "data_max_tokens": sorted({_norm(t) for t in inp.data_max_tokens if _norm(t)}), "notes": notes})
    row["metrics_json"] = json.dumps(metrics, sort_keys=True, default=str)
    return row


def member_comparison(inp: TargetInputs) -> list[dict[str, Any]]:
    """Per member latent of a combination: its own best dream activation (``latent_acts[j]``, member
    order) against its own dataset max (best matched window alone, and in context), and the ratio.

    Returns:
        one dict per member: ``latent``, ``dream_best``, ``dream_best_ce`` (all tokens), ``data_max_alone``,
        ``data_max_in_context``, ``ratio`` (dream_best / data_max_alone; None when ≤ 0 or unknown).
    """
    out = []
    for j, lat in enumerate(inp.latents):
        vals = [(float(d["latent_acts"][j]), d.get("ce")) for d in inp.dreams
                if d.get("latent_acts") is not None and len(d["latent_acts"]) > j and d["latent_acts"][j] is not None
                and math.isfinite(float(d["latent_acts"][j]))]
        i = _argbest(vals)
        m = next((x for x in inp.members if int(x["latent"]) == int(lat)), {})
        alone = m.get("window_max")
        out.append({"latent": int(lat), "dream_best": vals[i][0] if i is not None else None, "dream_best_ce": vals[i][1] if i is not None else None,
                    "data_max_alone": alone, "data_max_in_context": m.get("max_act"),
                    "ratio": _ratio(vals[i][0], alone) if i is not None else None})
    return out


def summarize(rows: Sequence[dict[str, Any]], scan: dict[str, Any]) -> dict[str, Any]:
    """Batch-level ``compare_summary`` fields, over single-latent targets only (combinations are never mixed in).

    Returns:
        ``n_targets`` (all), ``n_single``, ``frac_beats`` / ``frac_beats_in_dist`` (fractions over the
        single latents where the column is not NULL), ``n_dominates`` / ``n_dominance_known`` /
        ``frac_dominates`` (the primary verdict), the CE convention (or 'mixed') and its corpus bands.
    """
    single = [r for r in rows if not r.get("is_combination")]

    def frac(key: str) -> float | None:
        v = [r[key] for r in single if r.get(key) is not None]
        return sum(bool(x) for x in v) / len(v) if v else None

    convs = {r.get("ce_convention") for r in single if r.get("ce_convention")}
    conv = convs.pop() if len(convs) == 1 else ("mixed" if convs else None)
    bands = band_limits(scan, conv if conv in ("all", "rest") else "all")
    known = [r for r in single if r.get("dominates") is not None]
    return {"n_targets": len(rows), "n_single": len(single), "frac_beats": frac("beats_data"), "frac_beats_in_dist": frac("beats_data_in_dist"),
            "n_dominance_known": len(known), "n_dominates": sum(bool(r["dominates"]) for r in known), "frac_dominates": frac("dominates"),
            "ce_convention": conv, "ce_mean": bands["mean"], "ce_std": bands["std"], "in_dist_threshold": bands["in_dist"],
            "ce_p10": bands["p10"], "ce_p50": bands["p50"]}
