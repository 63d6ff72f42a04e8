"""The atlas's rows (issue 15): each night's summary rows (``atlas_latents``; :func:`record_night`)
and what the atlas reads back from them (:func:`atlas_entries`, :func:`other_nights`).
:mod:`reports.atlas` renders them; :mod:`reports.night_diffs` compares two nights.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path
from typing import Any

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store, now
from reverie.reports.data import EXPLANATION_PREFERENCE


def atlas_dir(cfg: ReverieConfig) -> Path:
    """The atlas folder: ``<project dir>/reports``."""
    return cfg.project.path / "reports"


def rel_path(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _text(tokens: Any) -> str | None:
    return "".join(str(t) for t in tokens) if tokens else None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


# ---------------------------------------------------------------------------- summary rows
def summary_rows(cfg: ReverieConfig, store: Store, run_id: str) -> list[dict[str, Any]]:
    """One ``atlas_latents`` row per target of a run, read from its stored rows.

    The score is the summary explanation's (source order both, dataset, dreams) balanced accuracy
    on the dataset held-out set (detection scorer first), with its 95% interval.

    Returns:
        Rows (dicts keyed by ``atlas_latents`` column); empty when the run has no targets.
    Raises:
        ReverieError: no such run.
    """
    from reverie.reports.render import default_out_dir, page_name

    run = store.fetch_one("SELECT run_id, started_at, config_hash FROM runs WHERE run_id = ?", [run_id])
    if run is None:
        raise ReverieError(f"no run {run_id!r} in {store.path}")
    started = run["started_at"]
    night = started.strftime("%Y-%m-%d") if isinstance(started, dt.datetime) else str(started or "")[:10]
    out_dir = default_out_dir(cfg, run_id)
    rows = []
    for t in store.fetch("SELECT * FROM targets WHERE run_id = ? ORDER BY target_id", [run_id]):
        tid = t["target_id"]
        comp = store.fetch_one("SELECT * FROM comparisons WHERE run_id = ? AND target_id = ?", [run_id, tid]) or {}
        druns = store.fetch("SELECT d.dream_id, d.fingerprint, d.reused_from, max(p.activation) AS best FROM dream_runs d "
                            "LEFT JOIN dream_prompts p USING (dream_id) WHERE d.run_id = ? AND d.target_id = ? "
                            "GROUP BY ALL ORDER BY d.dream_id", [run_id, tid])
        best = store.fetch_one("SELECT p.text, p.activation, p.ce FROM dream_prompts p JOIN dream_runs d USING (dream_id) "
                               "WHERE d.run_id = ? AND d.target_id = ? ORDER BY p.activation DESC LIMIT 1", [run_id, tid])
        example = None
        if comp.get("scan_id"):
            ex = store.fetch_one("SELECT tokens FROM scan_examples WHERE scan_id = ? AND latent = ? AND kind = 'top' ORDER BY rank LIMIT 1",
                                 [comp["scan_id"], int(t["latents"][0])])
            example = _text(ex["tokens"]) if ex else None
        expls = store.fetch("SELECT explanation_id, source, text FROM explanations WHERE run_id = ? AND target_id = ? "
                            "ORDER BY explanation_id", [run_id, tid])
        pref = list(EXPLANATION_PREFERENCE)
        expl = min(expls, key=lambda e: pref.index(e["source"]) if e["source"] in pref else len(pref), default=None)
        score = None
        if expl is not None:
            score = store.fetch_one(
                "SELECT scorer, holdout_set, metric, value, ci_low, ci_high FROM explain_scores WHERE explanation_id = ? "
                "AND NOT baseline AND metric = 'balanced_accuracy' ORDER BY holdout_set <> 'dataset', scorer <> 'detection' LIMIT 1",
                [expl["explanation_id"]])
        seed_best = [_finite(d["best"]) for d in druns if _finite(d["best"]) is not None]
        reused = next((d["reused_from"] for d in druns if d["reused_from"]), None)
        rows.append({
            "run_id": run_id, "target_id": tid, "night": night, "started_at": started, "model_key": t["model_key"],
            "sae_key": t["sae_key"], "hook_name": t["hook_name"], "latents": [int(x) for x in t["latents"]], "combine": t["combine"],
            "log10_density": list(t["log10_density"] or []), "dream_fp": next((d["fingerprint"] for d in druns if d["fingerprint"]), None),
            "config_hash": run["config_hash"], "verdict": comp.get("verdict"), "dominates": comp.get("dominates"),
            "dream_max": _finite(comp.get("dream_max")) if comp else (max(seed_best) if seed_best else None),
            "data_max": _finite(comp.get("data_max")), "ratio": _finite(comp.get("ratio")),
            "best_dream": best["text"] if best else None, "best_dream_act": _finite(best["activation"]) if best else None,
            "best_dream_ce": _finite(best["ce"]) if best else None, "top_example": example,
            "explanation": expl["text"] if expl else None, "explanation_source": expl["source"] if expl else None,
            "score_metric": f"{score['scorer']} {score['metric']} on {score['holdout_set']}" if score else None,
            "score": _finite(score["value"]) if score else None, "score_ci_low": _finite(score["ci_low"]) if score else None,
            "score_ci_high": _finite(score["ci_high"]) if score else None, "n_seeds": len(druns),
            "seed_max_min": min(seed_best) if seed_best else None, "seed_max_max": max(seed_best) if seed_best else None,
            "dreams_reused_from": reused.split("/", 1)[0] if reused else None,
            "page": rel_path(out_dir / page_name(tid), atlas_dir(cfg)), "updated_at": now(),
        })
    return rows


def record_night(cfg: ReverieConfig, store: Store, run_id: str) -> int:
    """Replace a run's ``atlas_latents`` rows with fresh ones (:func:`summary_rows`).

    Returns:
        The number of rows written.
    Raises:
        ReverieError: no such run; StoreWriteError: the database cannot be written.
    """
    return store.replace("atlas_latents", {"run_id": run_id}, summary_rows(cfg, store, run_id))


def atlas_entries(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The atlas index: one entry per (SAE, model, target) with its latest night's row and every
    night it was seen, and the list of nights (newest first) with their diff counts.

    Returns:
        ``(entries, nights)``; entries hold only JSON-able values.
    """
    rows = store.fetch("SELECT a.*, r.status AS run_status FROM atlas_latents a LEFT JOIN runs r USING (run_id) "
                       "ORDER BY a.started_at, a.run_id")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sae_key"], r["model_key"], r["target_id"]), []).append(r)
    entries = []
    for (sae, model, tid), rs in groups.items():
        last = rs[-1]
        dens = [d for d in (last["log10_density"] or []) if d is not None]
        entries.append({
            "id": f"{sae}|{tid}", "sae": sae, "model": model, "target": tid, "latents": list(last["latents"]), "combine": last["combine"],
            "verdict": last["verdict"], "dominates": last["dominates"], "ratio": last["ratio"], "dream_max": last["dream_max"],
            "data_max": last["data_max"], "explanation": last["explanation"], "score": last["score"], "score_ci": (
                [last["score_ci_low"], last["score_ci_high"]] if last["score_ci_low"] is not None and last["score_ci_high"] is not None else None),
            "score_metric": last["score_metric"], "density": min(dens) if dens else None, "best_dream": last["best_dream"],
            "top_example": last["top_example"], "n_seeds": last["n_seeds"],
            "seed_spread": [last["seed_max_min"], last["seed_max_max"]] if last["seed_max_min"] is not None else None,
            "nights": [{"run": r["run_id"], "night": r["night"], "page": r["page"], "verdict": r["verdict"],
                        "reused": r["dreams_reused_from"]} for r in rs],
            "search": " ".join(x for x in {r2[k] for r2 in rs for k in ("explanation", "best_dream", "top_example")} if x),
        })
    entries.sort(key=lambda e: (e["sae"], e["target"].count("+"), [int(x) if x.isdigit() else 0 for x in e["target"].split("+")]))
    nights = store.fetch(
        "SELECT a.run_id, min(a.night) AS night, min(a.started_at) AS started_at, count(*) AS n_targets, any_value(r.status) AS status, "
        "any_value(r.gc_at) AS gc_at FROM atlas_latents a LEFT JOIN runs r USING (run_id) GROUP BY a.run_id ORDER BY min(a.started_at) DESC")
    counts = {(r["run_b"], r["kind"]): r["n"] for r in store.fetch("SELECT run_b, kind, count(*) AS n FROM night_diffs GROUP BY ALL")}
    for n in nights:
        n["diff"] = {k: counts.get((n["run_id"], k), 0) for k in ("new", "returning", "changed", "regression", "fingerprint")}
        n["has_diff"] = any(n["diff"].values()) or bool(store.fetch_one("SELECT 1 AS x FROM night_diffs WHERE run_b = ? LIMIT 1", [n["run_id"]]))
    return entries, nights


def other_nights(cfg: ReverieConfig, store: Store, run_id: str, sae_key: str, target_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """The same target's pages on other nights (atlas rows), as ``{"run", "night", "href", "verdict"}``
    with ``href`` relative to ``out_dir`` (the page being rendered), oldest first."""
    if "atlas_latents" not in store.tables():  # a database older than migration 0011, opened read-only
        return []
    rows = store.fetch("SELECT run_id, night, page, verdict FROM atlas_latents WHERE sae_key = ? AND target_id = ? AND run_id <> ? "
                       "ORDER BY started_at, run_id", [sae_key, target_id, run_id])
    return [{"run": r["run_id"], "night": r["night"], "verdict": r["verdict"],
             "href": rel_path(atlas_dir(cfg) / r["page"], out_dir)} for r in rows]
