"""Everything a report page needs, read from the Store into the plain dataclasses of :mod:`reports.views`.

The report reads, never writes. The SQL migrations are the contract (``pipeline/migrations``:
0001 runs/targets/units, 0002 dream, 0003 scan, 0004 compare, 0005 explain); any stage may not
have run yet, and an older database may lack the later tables, so every loader returns empty
values (``None`` / ``[]``) for what is missing instead of failing. Which scan serves a target is
:func:`pipeline.lookup.scan_choice` (the same rule as compare and explain).

Values keep the store's units: activations are the objective's value (the SAE latent quantity
the targets section chose, e.g. pre-activation), cross-entropy (CE) is in nats/token,
densities are log10 firing frequencies.
"""

from __future__ import annotations

import json
import re
from typing import Any

from reverie.pipeline.errors import ReverieError
from reverie.pipeline.lookup import scan_choice
from reverie.pipeline.store import Store
from reverie.reports.ledger import run_cost, target_cost
from reverie.reports.views import (  # noqa: F401 - the read models, importable from here too
    EXPLANATION_PREFERENCE, AttributionToken, Comparison, CompareSummary, DataWindow, DreamPromptView, DreamRun, ExampleView,
    ExplanationView, HistoryPoint, LatentScan, RunData, RunInfo, ScanInfo, ScoreView, TargetData, UnitInfo,
)
from reverie.sae_targets.spec import Baseline


# ---------------------------------------------------------------------------- helpers
def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _floats(xs: Any) -> list[float] | None:
    return None if xs is None else [float("nan") if x is None else float(x) for x in xs]


class _Reader:
    """Store reads that tolerate tables an older database does not have."""

    def __init__(self, store: Store):
        self.store = store
        self.tables = set(store.tables())

    def rows(self, table: str, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.store.fetch(sql, params) if table in self.tables else []


_SEED_RE = re.compile(r"seed(-?\d+)$")


def _seed_of(dream_id: str, seeds: dict[str, int]) -> int:
    if dream_id in seeds:
        return seeds[dream_id]
    m = _SEED_RE.search(dream_id)
    return int(m.group(1)) if m else 0


def neuronpedia_id_for(store: Store, run_id: str, summary: dict[str, Any]) -> str | None:
    """The SAE's Neuronpedia id as recorded at run start (table ``run_saes``, registry SAEs
    included), else ``runs.summary_json['neuronpedia_id']`` (runs recorded before migration 0012),
    else None. The SAE's folder is never re-read: it may have changed since the run."""
    try:
        row = store.fetch_one("SELECT neuronpedia_id FROM run_saes WHERE run_id = ?", [run_id])
    except Exception:  # noqa: BLE001 - a database older than migration 0012 has no such table
        row = None
    np_id = row.get("neuronpedia_id") if row else None
    if not (isinstance(np_id, str) and np_id):
        np_id = summary.get("neuronpedia_id")
    return np_id if isinstance(np_id, str) and np_id else None


# ---------------------------------------------------------------------------- loaders
def load_run_info(store: Store, run_id: str) -> RunInfo:
    """Read one run's metadata.

    Raises:
        ReverieError: no such run (the message lists the latest run ids).
    """
    row = store.fetch_one("SELECT * FROM runs WHERE run_id = ?", [run_id])
    if row is None:
        recent = [r["run_id"] for r in store.fetch("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5")]
        raise ReverieError(f"run {run_id!r} not found in {store.path}; recent runs: {', '.join(recent) or 'none'}. Pass --run with one of them.")
    summary = _json(row["summary_json"])
    return RunInfo(
        run_id=row["run_id"], kind=row["kind"], status=row["status"], started_at=row["started_at"],
        ended_at=row["ended_at"], wall_s=row["wall_s"], code_version=row["code_version"],
        config_hash=row["config_hash"], config=_json(row["config_json"]), summary=summary,
    )


def _scan_info(rd: _Reader, scan_id: str, chosen_by: str) -> ScanInfo | None:
    """The ``scans`` row ``scan_id`` as the page shows it; None when the row is missing."""
    rows = rd.rows("scans", "SELECT * FROM scans WHERE scan_id = ?", [scan_id])
    if not rows:
        return None
    r = rows[0]
    return ScanInfo(
        scan_id=r["scan_id"], status=r["status"], tokens_seen=int(r["tokens_seen"]), n_contexts=int(r["n_contexts"]),
        window_len=r["window_len"], ce_mean=r["ce_mean"], ce_std=r["ce_std"], in_dist_threshold=r["in_dist_threshold"],
        corpus=_json(r["corpus_json"]), created_at=r["created_at"], chosen_by=chosen_by,
        bands={"all": {"p10": r.get("ce_p10"), "p50": r.get("ce_p50"), "mean": r["ce_mean"], "std": r["ce_std"], "in_dist": r["in_dist_threshold"]},
               "rest": {"p10": r.get("ce_rest_p10"), "p50": r.get("ce_rest_p50"), "mean": r.get("ce_rest_mean"), "std": r.get("ce_rest_std"),
                        "in_dist": r.get("ce_rest_in_dist_threshold")}},
        corpus_counts={k: int(r[f"corpus_{k}"]) for k in ("documents", "bad_lines", "no_text", "bad_bytes", "cleaned_chars")
                       if r.get(f"corpus_{k}") is not None},
    )


def _example(r: dict[str, Any]) -> ExampleView:
    return ExampleView(
        latent=int(r["latent"]), kind=r["kind"], rank=int(r["rank"]), bin=r["bin"], tokens=list(r["tokens"]),
        acts=_floats(r["acts"]) or [], max_act=float(r["max_act"]), max_pos=int(r["max_pos"]),
        window_ce=r["window_ce"], window_act=r["window_act"], window_ce_rest=r.get("window_ce_rest"),
    )


def _latent_scan(rd: _Reader, scan_id: str, latent: int, n_top: int, n_per_bin: int) -> LatentScan:
    ls = LatentScan(latent=latent)
    for r in rd.rows("scan_latents", "SELECT * FROM scan_latents WHERE scan_id = ? AND latent = ?", [scan_id, latent]):
        ls.n_tokens, ls.n_firing, ls.density = r["n_tokens"], r["n_firing"], r["density"]
        ls.max_act, ls.mean_act = r["max_act"], r["mean_act"]
        ls.hist_edges, ls.hist_counts = _floats(r["hist_edges"]), r["hist_counts"]
        ls.window_max, ls.n_windows_searched = r.get("window_max"), r.get("n_windows_searched")
        ls.n_contexts_searched, ls.n_short_contexts = r.get("n_contexts_searched"), r.get("n_short_contexts")
    ls.top = [_example(r) for r in rd.rows(
        "scan_examples", "SELECT * FROM scan_examples WHERE scan_id = ? AND latent = ? AND kind = 'top' ORDER BY rank LIMIT ?",
        [scan_id, latent, n_top])]
    ls.quantiles = [_example(r) for r in rd.rows(
        "scan_examples",
        "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY bin ORDER BY rank) AS k FROM scan_examples "
        "WHERE scan_id = ? AND latent = ? AND kind = 'quantile') WHERE k <= ? ORDER BY bin DESC NULLS LAST, rank",
        [scan_id, latent, n_per_bin])]
    return ls


def _dreams(rd: _Reader, td: TargetData, run_id: str) -> None:
    runs = rd.rows("dream_runs", "SELECT * FROM dream_runs WHERE run_id = ? AND target_id = ? ORDER BY seed", [run_id, td.target_id])
    td.dream_runs = [
        DreamRun(dream_id=r["dream_id"], seed=int(r["seed"]), objective=r["objective"], n_iterations=int(r["n_iterations"]),
                 n_candidates=int(r["n_candidates"]), wall_s=float(r["wall_s"]), config=_json(r["config_json"]),
                 objective_key=r.get("objective_key"), stop_reason=r.get("stop_reason"),
                 objective_scale=None if r.get("objective_scale") is None else str(r.get("objective_scale")))
        for r in runs
    ]
    if not runs:
        return
    seeds = {d.dream_id: d.seed for d in td.dream_runs}
    ids = list(seeds)
    marks = ", ".join("?" for _ in ids)
    attrs: dict[tuple[str, int], list[AttributionToken]] = {}
    for r in rd.rows("dream_attributions", f"SELECT * FROM dream_attributions WHERE dream_id IN ({marks}) ORDER BY dream_id, idx, position", ids):
        try:
            reps = [(str(x.get("token", "")), float(x.get("activation", float("nan")))) for x in json.loads(r["replacements_json"] or "[]")]
        except (TypeError, ValueError, AttributeError):
            reps = []
        attrs.setdefault((r["dream_id"], int(r["idx"])), []).append(
            AttributionToken(position=int(r["position"]), token=r["token"], drop_worst=float(r["drop_worst"]),
                             drop_best=float(r["drop_best"]), replacements=reps))
    td.prompts = [
        DreamPromptView(
            dream_id=r["dream_id"], seed=_seed_of(r["dream_id"], seeds), idx=int(r["idx"]), tokens=list(r["tokens"]),
            text=r["text"], activation=float(r["activation"]), ce=float(r["ce"]), perplexity=float(r["perplexity"]),
            lam=r["lam"], iteration=int(r["iteration"]), token_acts=_floats(r["token_acts"]),
            latent_acts=_floats(r["latent_acts"]), attribution=attrs.get((r["dream_id"], int(r["idx"]))),
            ce_rest=None if r.get("ce_rest") is None else float(r["ce_rest"]), n_tokens=len(r["token_ids"]) if r.get("token_ids") is not None else None,
        )
        for r in rd.rows("dream_prompts", f"SELECT * FROM dream_prompts WHERE dream_id IN ({marks}) ORDER BY activation DESC, dream_id, idx", ids)
    ]
    td.history = [
        HistoryPoint(seed=_seed_of(r["dream_id"], seeds), iteration=int(r["iteration"]), activation=float(r["activation"]), ce=float(r["ce"]))
        for r in rd.rows("dream_history", f"SELECT * FROM dream_history WHERE dream_id IN ({marks}) ORDER BY dream_id, iteration, ce", ids)
    ]


def _comparison(r: dict[str, Any]) -> Comparison:
    keys = [f for f in Comparison.__dataclass_fields__ if f != "metrics"]
    return Comparison(**{k: r.get(k) for k in keys}, metrics=_json(r.get("metrics_json")))


def _explanations(rd: _Reader, td: TargetData, run_id: str) -> None:
    rows = rd.rows("explanations", "SELECT * FROM explanations WHERE run_id = ? AND target_id = ? ORDER BY source, created_at", [run_id, td.target_id])
    for r in rows:
        scores = [ScoreView(holdout_set=s["holdout_set"], baseline=bool(s["baseline"]), metric=s["metric"], value=float(s["value"]), n=int(s["n"]),
                        scorer=s.get("scorer") or "detection", ci_low=s.get("ci_low"), ci_high=s.get("ci_high"), n_pos=s.get("n_pos"),
                        n_neg=s.get("n_neg"), n_pos_wanted=s.get("n_pos_wanted"), n_neg_wanted=s.get("n_neg_wanted"), n_hard_neg=s.get("n_hard_neg"))
                  for s in rd.rows("explain_scores", "SELECT * FROM explain_scores WHERE explanation_id = ?", [r["explanation_id"]])]
        td.explanations.append(ExplanationView(explanation_id=r["explanation_id"], source=r["source"], model=r["model"], text=r["text"], scores=scores))
    td.explain_failures = [(r["what"], r["why"]) for r in rd.rows(
        "explain_failures", "SELECT what, why FROM explain_failures WHERE run_id = ? AND target_id = ? ORDER BY created_at", [run_id, td.target_id])]


def load_target(store: Store, run_id: str, target_id: str, n_top: int = 20, n_per_bin: int = 2) -> TargetData:
    """Read one target's page data: dreams (all seeds), comparison, scan side, explanations.

    Args:
        n_top: top-k dataset examples read per latent (and combination windows).
        n_per_bin: quantile samples read per activation decile.
    Raises:
        ReverieError: the run has no such target.
    """
    rd = _Reader(store)
    t = store.fetch_one("SELECT * FROM targets WHERE run_id = ? AND target_id = ?", [run_id, target_id])
    if t is None:
        raise ReverieError(f"target {target_id!r} is not part of run {run_id!r}")
    td = TargetData(
        target_id=t["target_id"], latents=[int(x) for x in t["latents"]], combine=t["combine"],
        log10_density=list(t["log10_density"] or [None] * len(t["latents"])), density_source=t["density_source"],
        model_key=t["model_key"], sae_key=t["sae_key"], hook_name=t["hook_name"],
    )
    td.units = [UnitInfo(stage=u["stage"], target_id=u["target_id"], status=u["status"], wall_s=u["wall_s"], error=u["error"])
                for u in rd.rows("units", "SELECT * FROM units WHERE run_id = ? AND target_id IN (?, '*') ORDER BY stage", [run_id, target_id])]
    _dreams(rd, td, run_id)
    comp = rd.rows("comparisons", "SELECT * FROM comparisons WHERE run_id = ? AND target_id = ?", [run_id, target_id])
    td.comparison = _comparison(comp[0]) if comp else None
    choice = scan_choice(store, run_id, target_id=target_id)
    td.scan = _scan_info(rd, choice.scan_id, choice.chosen_by) if choice else None
    if td.scan:
        td.latent_scans = [_latent_scan(rd, td.scan.scan_id, lat, n_top, n_per_bin) for lat in td.latents]
        # the dream runs' objective keys when stored, else any objective of this target id
        keys = {d.objective_key for d in td.dream_runs if d.objective_key}
        td.baselines = [
            Baseline(objective_key=b["objective_key"], n=int(b["n"]), length=int(b["length"]), mean=float(b["mean"]), std=float(b["std"]), max=float(b["max"]))
            for b in rd.rows("baselines", "SELECT * FROM baselines WHERE scan_id = ? ORDER BY objective_key", [td.scan.scan_id])
            if (b["objective_key"] in keys if keys else b["objective_key"].rsplit(":", 1)[-1] == target_id)
        ]
        if td.is_combination:
            td.objective_windows = [
                (float(r["window_ce"]), float(r["window_act"])) for r in rd.rows(
                    "scan_objective_examples",
                    "SELECT objective_key, window_ce, window_act FROM scan_objective_examples WHERE scan_id = ? "
                    "AND window_ce IS NOT NULL AND window_act IS NOT NULL ORDER BY rank", [td.scan.scan_id])
                if r["objective_key"].rsplit(":", 1)[-1] == target_id
            ][:n_top]
        td.data_windows = [
            DataWindow(tokens=list(r["tokens"]), act=float(r["window_act"]), ce=float(r["window_ce"]), ce_rest=r["window_ce_rest"],
                       latent=int(r["latent"]), context_idx=int(r["context_idx"]), end_pos=int(r["end_pos"]),
                       latent_acts=_floats(r["latent_acts"]), frontier_all=bool(r["frontier_all"]), frontier_rest=bool(r["frontier_rest"]))
            for r in rd.rows("scan_windows", "SELECT * FROM scan_windows WHERE scan_id = ? ORDER BY objective_key, rank", [td.scan.scan_id])
            if r["objective_key"] in keys or (not keys and r["objective_key"].rsplit(":", 1)[-1] == target_id)
        ]
    order_dreams(td)
    _explanations(rd, td, run_id)
    td.cost = target_cost(rd.rows, run_id, target_id)
    td.extra_seeds = [(r["seed"], r["status"], r["reason"]) for r in rd.rows(
        "extra_seeds", "SELECT seed, status, reason FROM extra_seeds WHERE run_id = ? AND target_id = ? ORDER BY created_at", [run_id, target_id])]
    return td


def dream_beats_dataset(td: TargetData, p: DreamPromptView) -> bool:
    """Whether a dream's activation is above the dataset's (window alone, matched length): for one latent,
    above the best searched window; for a combination, every member latent above its own dataset max
    (window alone). False when the dataset side is unknown."""
    if td.is_combination:
        maxima = [ls.window_max for ls in td.latent_scans]
        if not p.latent_acts or len(maxima) != len(p.latent_acts) or any(m is None for m in maxima):
            return False
        return all(a > m for a, m in zip(p.latent_acts, maxima))
    ref = td.comparison.data_best_act if td.comparison and td.comparison.data_best_act is not None else (
        td.comparison.data_max if td.comparison else None)
    return ref is not None and p.activation > ref


def order_dreams(td: TargetData) -> None:
    """The pages' default dream order (issue 11 §4): dreams that beat the dataset first, by CE
    ascending (the most fluent winner first), then the rest by CE ascending."""
    td.prompts.sort(key=lambda p: (not dream_beats_dataset(td, p), p.ce, -p.activation, p.dream_id, p.idx))


def load_run(store: Store, run_id: str, n_top: int = 20, n_per_bin: int = 2) -> RunData:
    """Read a whole run for the report: metadata, every target's page data, batch summary.

    Raises:
        ReverieError: no such run.
    """
    rd = _Reader(store)
    run = load_run_info(store, run_id)
    ids = [r["target_id"] for r in store.fetch("SELECT target_id FROM targets WHERE run_id = ?", [run_id])]
    ids.sort(key=lambda s: (s.count("+"), [int(x) if x.isdigit() else 0 for x in s.split("+")], s))
    targets = [load_target(store, run_id, tid, n_top=n_top, n_per_bin=n_per_bin) for tid in ids]
    if targets:
        run.neuronpedia_id = neuronpedia_id_for(store, run_id, run.summary)
    cs = rd.rows("compare_summary", "SELECT * FROM compare_summary WHERE run_id = ?", [run_id])
    summary = CompareSummary(**{k: cs[0].get(k) for k in CompareSummary.__dataclass_fields__}) if cs else None
    units = [UnitInfo(stage=u["stage"], target_id=u["target_id"], status=u["status"], wall_s=u["wall_s"], error=u["error"])
             for u in rd.rows("units", "SELECT * FROM units WHERE run_id = ? AND target_id = '*' ORDER BY stage", [run_id])]
    failures = [(r["what"], r["why"]) for r in rd.rows(
        "explain_failures", "SELECT what, why FROM explain_failures WHERE run_id = ? AND target_id = '*' ORDER BY created_at", [run_id])]
    scan_id = next((t.scan.scan_id for t in targets if t.scan), None)
    cost = run_cost(rd.rows, run_id, ids, scan_id)
    return RunData(run=run, targets=targets, compare_summary=summary, units=units, failures=failures, cost=cost)
