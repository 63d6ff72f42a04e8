"""The compare stage: dreams vs. max-activating dataset examples, per target and per batch.

Per target (Thompson et al. 2024, Fig. 3 and §3.5): the best dream activation and the best
dataset-window activation (dream-length windows ending at each top example's max token, fed
alone after BOS), their ratio; the best of each with CE ≤ ``compare.ce_limit`` (4 nats/token
in the paper's discussion) and with CE ≤ the scan's in-distribution threshold (corpus window
CE mean + 2σ); z-scores of both maxima against the random-prompt baseline (eq. 5:
z = (a − μ_random) / σ_random); how many prompts of the merged Pareto frontier (all seeds)
beat the dataset maximum; and the overlap between the dreams' most important tokens (token
attribution, Fig. 1: largest drop from the best alternative) and the tokens at the dataset
examples' maxima. Per batch: the fraction of targets where dreaming beats the dataset,
overall and at in-distribution CE.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline.config import CompareConfig, ReverieConfig
from pipeline.errors import ReverieError
from pipeline.store import Store
from sae_targets.objectives import build_objective
from sae_targets.selection import Target

DREAM_FIELDS = ("dream_max", "dream_best_ce_limit", "dream_best_in_dist", "dream_z", "n_beating", "attribution_overlap")


@dataclass
class TargetInputs:
    """Everything compare needs for one target (plain data).

    Attributes:
        dreams: dicts with ``activation``, ``ce`` (nats/token), ``text``, ``dream_id``, ``idx``, all seeds merged.
        attributions: dicts with ``dream_id``, ``idx``, ``position``, ``token``, ``drop_best``, ``drop_worst``.
        data: dataset windows as dicts with ``window_act`` and ``window_ce`` (None where unknown).
        data_max_tokens: tokens at the max of the target's latents' top examples.
        baseline: random-prompt ``{"mean", "std", "max", "n", "objective_key"}`` or None.
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


def compare_target(inp: TargetInputs, ccfg: CompareConfig, in_dist: float | None) -> dict[str, Any]:
    """One ``comparisons`` row (without run/scan ids) from a target's inputs.

    Dream fields are None when the target has no dreams; dataset fields None when the scan has
    no windows for it; ratio None when the dataset maximum is ≤ 0; z-scores None without a
    baseline (or σ = 0).
    """
    notes = list(inp.notes)
    dpts = [(float(d["activation"]), float(d["ce"])) for d in inp.dreams]
    data = [(d["window_act"], d["window_ce"]) for d in inp.data]
    data_max = _best(data)
    data_lim = _best(data, ccfg.ce_limit)
    data_in = _best(data, in_dist) if in_dist is not None else None
    row: dict[str, Any] = {"target_id": inp.target_id, "data_max": data_max, "data_best_ce_limit": data_lim,
                           "data_best_in_dist": data_in, "data_z": _z(data_max, inp.baseline)}
    metrics: dict[str, Any] = {
        "latents": inp.latents, "combine": inp.combine, "objective_key": inp.objective_key, "ce_limit": ccfg.ce_limit,
        "in_dist_threshold": in_dist, "data_source": inp.data_source, "n_data_windows": len(data),
        "baseline": inp.baseline, "n_seeds": inp.n_seeds, "n_prompts": len(dpts),
    }
    if not inp.data:
        notes.append("no dataset windows for this target in the scan")
    if data_max is not None and data_max <= 0:
        notes.append("dataset maximum ≤ 0: ratio undefined")
    if not dpts:
        notes.append("no dreams for this target in this run")
        row.update({k: None for k in DREAM_FIELDS})
        row.update({"ratio": None, "beats_data": None, "beats_data_in_dist": None})
    else:
        front = pareto_frontier(dpts)
        dream_max = max(a for a, _ in dpts)
        dream_lim = _best(dpts, ccfg.ce_limit)
        dream_in = _best(dpts, in_dist) if in_dist is not None else None
        top_tokens = attribution_top_tokens(inp.attributions, ccfg.attribution_top_tokens)
        data_tokens = {_norm(t) for t in inp.data_max_tokens if _norm(t)}
        overlap = (sum(t in data_tokens for t in top_tokens) / len(top_tokens)) if top_tokens and data_tokens else None
        row.update({
            "dream_max": dream_max, "dream_best_ce_limit": dream_lim, "dream_best_in_dist": dream_in,
            "ratio": _ratio(dream_max, data_max), "dream_z": _z(dream_max, inp.baseline),
            "n_beating": sum(dpts[i][0] > data_max for i in front) if data_max is not None else None,
            "attribution_overlap": overlap,
            "beats_data": None if data_max is None else dream_max > data_max,
            "beats_data_in_dist": (None if in_dist is None or (dream_in is None and data_in is None)
                                   else dream_in is not None and (data_in is None or dream_in > data_in)),
        })
        best = max(range(len(dpts)), key=lambda i: dpts[i][0])
        metrics.update({
            "n_frontier": len(front), "n_beating_all_prompts": sum(a > data_max for a, _ in dpts) if data_max is not None else None,
            "dream_max_ce": dpts[best][1], "dream_max_text": inp.dreams[best].get("text"),
            "dream_z_ce_limit": _z(dream_lim, inp.baseline), "dream_z_in_dist": _z(dream_in, inp.baseline),
            "attribution_tokens": top_tokens, "ratio_ce_limit": _ratio(dream_lim, data_lim), "ratio_in_dist": _ratio(dream_in, data_in),
        })
        if not inp.attributions:
            notes.append("no token attributions: overlap undefined")
    metrics.update({"data_z_ce_limit": _z(data_lim, inp.baseline), "data_z_in_dist": _z(data_in, inp.baseline),
                    "data_max_tokens": sorted({_norm(t) for t in inp.data_max_tokens if _norm(t)}), "notes": notes})
    row["metrics_json"] = json.dumps(metrics, sort_keys=True, default=str)
    return row


def summarize(rows: Sequence[dict[str, Any]], scan: dict[str, Any]) -> dict[str, Any]:
    """Batch-level ``compare_summary`` fields: fractions of targets where dreaming beats the dataset."""
    def frac(key: str) -> float | None:
        v = [r[key] for r in rows if r[key] is not None]
        return sum(bool(x) for x in v) / len(v) if v else None

    return {"n_targets": len(rows), "frac_beats": frac("beats_data"), "frac_beats_in_dist": frac("beats_data_in_dist"),
            "ce_mean": scan.get("ce_mean"), "ce_std": scan.get("ce_std"), "in_dist_threshold": scan.get("in_dist_threshold")}


# ----------------------------------------------------------------------------- reads


def load_inputs(cfg: ReverieConfig, store: Store, run_id: str, scan_id: str) -> tuple[dict[str, Any], list[TargetInputs]]:
    """Read a run's targets, dreams (all seeds), attributions and the scan's rows.

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
    dreams = store.fetch(
        "SELECT r.target_id, r.seed, p.dream_id, p.idx, p.activation, p.ce, p.text FROM dream_prompts p "
        "JOIN dream_runs r USING (dream_id) WHERE r.run_id = ? ORDER BY r.target_id, r.seed, p.idx", [run_id])
    attrs = store.fetch(
        "SELECT r.target_id, a.dream_id, a.idx, a.position, a.token, a.drop_best, a.drop_worst FROM dream_attributions a "
        "JOIN dream_runs r USING (dream_id) WHERE r.run_id = ?", [run_id])
    base = {r["objective_key"]: r for r in store.fetch("SELECT objective_key, n, mean, std, max FROM baselines WHERE scan_id = ?", [scan_id])}
    scanned = set(int(i) for i in scan["latents"])
    out = []
    for t in targets:
        target = Target(latents=[int(i) for i in t["latents"]], combine=t["combine"])
        key = build_objective(None, target, cfg.targets).key
        inp = TargetInputs(target_id=t["target_id"], latents=list(target.latents), combine=target.combine, objective_key=key,
                           baseline=base.get(key))
        inp.dreams = [d for d in dreams if d["target_id"] == t["target_id"]]
        inp.n_seeds = len({d["seed"] for d in inp.dreams})
        inp.attributions = [a for a in attrs if a["target_id"] == t["target_id"]]
        missing = [i for i in target.latents if i not in scanned]
        if missing:
            inp.notes.append(f"latents {missing} are not in scan {scan_id}")
        if target.is_combination:
            inp.data = store.fetch("SELECT window_act, window_ce FROM scan_objective_examples WHERE scan_id = ? AND objective_key = ?", [scan_id, key])
            inp.data_source = "combination objective on the dream-length windows of its latents' top examples"
        else:
            inp.data = store.fetch("SELECT window_act, window_ce FROM scan_examples WHERE scan_id = ? AND latent = ? AND kind = 'top'", [scan_id, target.latents[0]])
            inp.data_source = "dream-length windows ending at the latent's top examples' max tokens, fed alone after BOS"
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
    rows = [compare_target(inp, cfg.compare, scan.get("in_dist_threshold")) for inp in inputs]
    summary = summarize(rows, scan)
    write_compare(store, run_id, scan_id, rows, summary)
    return [{"run_id": run_id, "scan_id": scan_id, **r} for r in rows]


def _f(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def format_table(rows: Sequence[dict[str, Any]], summary: dict[str, Any], ce_limit: float) -> str:
    """The comparison table as plain text (one line per target, then the batch fractions)."""
    thr = summary.get("in_dist_threshold")
    head = (f"{'target':>10} {'dream max':>9} {'data max':>8} {'ratio':>6} {f'dream≤{ce_limit:g}':>9} {f'data≤{ce_limit:g}':>8} "
            f"{'dream≤thr':>9} {'data≤thr':>8} {'dream z':>7} {'data z':>7} {'n beat':>6} {'overlap':>7} {'beats':>5} {'beats≤thr':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['target_id']:>10} {_f(r['dream_max']):>9} {_f(r['data_max']):>8} {_f(r['ratio']):>6} {_f(r['dream_best_ce_limit']):>9} "
            f"{_f(r['data_best_ce_limit']):>8} {_f(r['dream_best_in_dist']):>9} {_f(r['data_best_in_dist']):>8} {_f(r['dream_z'], '.1f'):>7} "
            f"{_f(r['data_z'], '.1f'):>7} {_f(r['n_beating'], 'd'):>6} {_f(r['attribution_overlap']):>7} {_f(r['beats_data']):>5} {_f(r['beats_data_in_dist']):>9}")
    lines.append("")
    lines.append(f"dreaming beats the dataset on {_f(summary.get('frac_beats'), '.0%')} of targets, "
                 f"{_f(summary.get('frac_beats_in_dist'), '.0%')} at in-distribution CE (≤ {_f(thr)} nats/token = corpus window CE "
                 f"{_f(summary.get('ce_mean'))} + 2 × {_f(summary.get('ce_std'))})")
    return "\n".join(lines)
