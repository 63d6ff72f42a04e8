"""The compare stage: dreams vs. max-activating dataset windows, per target and per batch.

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

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from reverie.pipeline.config import CompareConfig, ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store
from reverie.sae_targets.objectives import build_objective
from reverie.sae_targets.selection import Target

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


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto frontier of ``(activation, ce)`` points: maximize activation, minimize CE.

    A point is kept unless another has activation ≥ and CE ≤ with one strict (exact duplicates: first kept).
    Returned in ascending CE.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    keep, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            keep.append(i)
            best = points[i][0]
    return keep


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


# ----------------------------------------------------------------------------- reads


def _columns(store: Store, table: str) -> set[str]:
    return {r["column_name"] for r in store.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])}


def load_inputs(cfg: ReverieConfig, store: Store, run_id: str, scan_id: str) -> tuple[dict[str, Any], list[TargetInputs]]:
    """Read a run's targets, dreams (all seeds), attributions and the scan's matched-length windows.

    Dataset side: the scan's searched frontier (``scan_windows``) for the target's objective, else
    (older scans) the top examples' windows that have exactly the scan's window length. Dream side:
    prompts whose length equals the scan's window length; ``ce_rest`` when ``dream_prompts`` has it.

    Returns:
        ``(scan row, inputs per target in target-id order)``.
    Raises:
        ReverieError: unknown run (no targets) or scan, or a scan that is not finished.
    """
    scan = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [scan_id])
    if scan is None:
        raise ReverieError(f"no scan {scan_id!r} in {store.path}; run `reverie scan` first")
    if scan["status"] != "done":
        raise ReverieError(f"scan {scan_id} is not finished (status {scan['status']}); rerun `reverie scan` to resume it")
    targets = store.fetch("SELECT target_id, latents, combine FROM targets WHERE run_id = ? ORDER BY len(latents), latents", [run_id])
    if not targets:
        raise ReverieError(f"run {run_id!r} has no targets in {store.path}; check the run id (`reverie compare --run ...`)")
    n = scan.get("window_len")
    rest = "p.ce_rest" if "ce_rest" in _columns(store, "dream_prompts") else "NULL"
    dreams = store.fetch(
        f"SELECT r.target_id, r.seed, p.dream_id, p.idx, p.activation, p.ce, {rest} AS ce_rest, p.text, p.latent_acts, "
        "len(p.token_ids) AS n_tokens FROM dream_prompts p "
        "JOIN dream_runs r USING (dream_id) WHERE r.run_id = ? ORDER BY r.target_id, r.seed, p.idx", [run_id])
    attrs = store.fetch(
        "SELECT r.target_id, a.dream_id, a.idx, a.position, a.token, a.drop_best, a.drop_worst FROM dream_attributions a "
        "JOIN dream_runs r USING (dream_id) WHERE r.run_id = ?", [run_id])
    base = {r["objective_key"]: r for r in store.fetch("SELECT objective_key, n, mean, std, max FROM baselines WHERE scan_id = ?", [scan_id])}
    lat_rows = {int(r["latent"]): r for r in store.fetch("SELECT * FROM scan_latents WHERE scan_id = ?", [scan_id])}
    has_windows = "scan_windows" in store.tables()
    scanned = set(int(i) for i in scan["latents"])
    out = []
    for t in targets:
        target = Target(latents=[int(i) for i in t["latents"]], combine=t["combine"])
        key = build_objective(None, target, cfg.targets).key
        inp = TargetInputs(target_id=t["target_id"], latents=list(target.latents), combine=target.combine, objective_key=key,
                           baseline=base.get(key))
        mine = [d for d in dreams if d["target_id"] == t["target_id"]]
        inp.dreams = [d for d in mine if n is None or int(d["n_tokens"]) == int(n)]
        inp.n_unmatched_dreams = len(mine) - len(inp.dreams)
        inp.n_seeds = len({d["seed"] for d in inp.dreams})
        inp.attributions = [a for a in attrs if a["target_id"] == t["target_id"]]
        missing = [i for i in target.latents if i not in scanned]
        if missing:
            inp.notes.append(f"latents {missing} are not in scan {scan_id}")
        inp.members = [{"latent": i, "window_max": lat_rows.get(i, {}).get("window_max"), "max_act": lat_rows.get(i, {}).get("max_act")}
                       for i in target.latents]
        if not target.is_combination:
            inp.data_max_in_context = lat_rows.get(target.latents[0], {}).get("max_act")
        inp.data = store.fetch("SELECT window_act, window_ce, window_ce_rest, tokens, context_idx, end_pos FROM scan_windows "
                               "WHERE scan_id = ? AND objective_key = ? ORDER BY rank", [scan_id, key]) if has_windows else []
        if inp.data:
            inp.data_source = ("every full-length window (the dream's length) of the top contexts, fed alone after BOS "
                               "(searched Pareto frontier)" + (" of the combined objective" if target.is_combination else ""))
        elif target.is_combination:
            inp.data = store.fetch("SELECT window_act, window_ce, window_ce_rest FROM scan_objective_examples WHERE scan_id = ? "
                                   "AND objective_key = ? AND len(window_ids) = ?", [scan_id, key, n])
            inp.data_source = "combination objective on the full-length windows ending at its latents' top examples' max tokens"
        else:
            inp.data = store.fetch("SELECT window_act, window_ce, window_ce_rest FROM scan_examples WHERE scan_id = ? AND latent = ? "
                                   "AND kind = 'top' AND len(window_ids) = ? AND window_ce IS NOT NULL", [scan_id, target.latents[0], n])
            inp.data_source = "full-length windows ending at the latent's top examples' max tokens, fed alone after BOS (scan without window search)"
        tok_rows = store.fetch("SELECT tokens, max_pos FROM scan_examples WHERE scan_id = ? AND kind = 'top' AND list_contains(?, latent)",
                               [scan_id, list(target.latents)])
        inp.data_max_tokens = [r["tokens"][r["max_pos"]] for r in tok_rows]
        if inp.baseline is None:
            inp.notes.append(f"no random-prompt baseline for objective {key} in scan {scan_id}; z-scores undefined (rerun `reverie scan` for these targets)")
        out.append(inp)
    return scan, out


def latest_run_with_dreams(store: Store) -> str | None:
    """The most recently started run that has dream rows, or None."""
    row = store.fetch_one("SELECT r.run_id FROM runs r WHERE EXISTS (SELECT 1 FROM dream_runs d WHERE d.run_id = r.run_id) "
                          "ORDER BY r.started_at DESC LIMIT 1")
    return row["run_id"] if row else None


def scan_for_run(store: Store, run_id: str) -> str | None:
    """The newest finished scan of the run's SAE whose latents cover all of the run's target latents."""
    targets = store.fetch("SELECT latents, sae_key, hook_name FROM targets WHERE run_id = ?", [run_id])
    if not targets:
        return None
    need = {int(i) for t in targets for i in t["latents"]}
    for s in store.fetch("SELECT scan_id, latents FROM scans WHERE status = 'done' AND sae_key = ? AND hook_name = ? ORDER BY updated_at DESC",
                         [targets[0]["sae_key"], targets[0]["hook_name"]]):
        if need <= {int(i) for i in s["latents"]}:
            return s["scan_id"]
    return None


# ----------------------------------------------------------------------------- writes


def write_compare(store: Store, run_id: str, scan_id: str, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Replace the run's ``comparisons`` and ``compare_summary`` rows in one transaction (idempotent)."""
    with store.transaction():
        store.replace("comparisons", {"run_id": run_id}, [{"run_id": run_id, "scan_id": scan_id, **r} for r in rows])
        store.replace("compare_summary", {"run_id": run_id}, [{"run_id": run_id, **summary}])


def run_compare(cfg: ReverieConfig, store: Store, run_id: str, scan_id: str) -> list[dict[str, Any]]:
    """Compare a run's dreams with a scan's dataset examples and store the results.

    Returns:
        The per-target ``comparisons`` rows (dicts, ``metrics_json`` as text): single latents first, by latent id.
    Raises:
        ReverieError: unknown run or scan, or an unfinished scan.
    """
    scan, inputs = load_inputs(cfg, store, run_id, scan_id)
    rows = [compare_target(inp, cfg.compare, scan) for inp in inputs]
    summary = summarize(rows, scan)
    write_compare(store, run_id, scan_id, rows, summary)
    return [{"run_id": run_id, "scan_id": scan_id, **r} for r in rows]


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
