"""The atlas (issue 15): one static site under ``<project>/reports/`` over every night.

Each night's report unit stores one summary row per target (``atlas_latents``; :func:`record_night`),
compares the night with the one before (``night_diffs``; :func:`diff_runs`, :func:`record_diff`) and
re-renders the atlas (:func:`render_atlas`):

* ``reports/index.html``: every latent ever explained (across nights, models and SAEs), its latest
  verdict, explanation, score with its 95% interval, density and the nights it was seen; filters by
  SAE, verdict, score and density, sorting, and full-text search over explanations, dreams and
  dataset examples. All client-side: the page loads ``atlas-index.js`` (a script file that assigns
  ``window.REVERIE_ATLAS``; ``fetch()`` of a local JSON file does not work from ``file://``) and
  builds its table with ``textContent`` only. The page's CSP allows scripts from the report folder
  (``'self'``) and the one hashed inline script; nothing else.
* ``reports/diff-<run>.html`` per night: latents new that night, changes beyond noise, regressions
  after a fingerprint change.

Summary rows are never dropped by ``reverie gc``, so the atlas outlives old nights' bulky rows.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store, now
from reverie.reports.data import EXPLANATION_PREFERENCE

ATLAS_JS = "atlas-index.js"
#: config sections whose change between two nights makes their results not comparable
FINGERPRINT_SECTIONS = ("model", "sae", "targets", "dream", "scan", "compare", "explain")
#: keys that change from night to night by design (not a fingerprint change)
_VOLATILE_KEYS = {("targets", "seed"), ("targets", "n_random"), ("targets", "latents"), ("targets", "combinations"),
                  ("targets", "allow_repeats"), ("model", "device"), ("explain", "max_concurrency")}
#: relative change of a dream maximum below which it is noise when a target has a single seed
DREAM_NOISE_REL = 0.05


def atlas_dir(cfg: ReverieConfig) -> Path:
    """The atlas folder: ``<project dir>/reports``."""
    return cfg.project.path / "reports"


def _rel(path: Path, start: Path) -> str:
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
            "page": _rel(out_dir / page_name(tid), atlas_dir(cfg)), "updated_at": now(),
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


# ---------------------------------------------------------------------------- diffs
def _sections(config_json: str | None) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(config_json or "{}")
    except ValueError:
        return {}
    return {s: {k: v for k, v in (data.get(s) or {}).items() if (s, k) not in _VOLATILE_KEYS} for s in FINGERPRINT_SECTIONS}


def fingerprint_changes(store: Store, run_a: str, run_b: str) -> list[dict[str, Any]]:
    """Configuration sections whose settings differ between two runs (volatile keys such as the
    nightly seed excluded), as ``{"section", "keys", "before", "after"}`` (values as JSON text)."""
    cfgs = {r["run_id"]: r["config_json"] for r in store.fetch("SELECT run_id, config_json FROM runs WHERE run_id IN (?, ?)", [run_a, run_b])}
    a, b = _sections(cfgs.get(run_a)), _sections(cfgs.get(run_b))
    out = []
    for s in FINGERPRINT_SECTIONS:
        sa, sb = a.get(s, {}), b.get(s, {})
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        if keys:
            out.append({"section": s, "keys": keys, "before": json.dumps({k: sa.get(k) for k in keys}, sort_keys=True, default=str),
                        "after": json.dumps({k: sb.get(k) for k in keys}, sort_keys=True, default=str)})
    return out


def _ci_apart(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two scores' 95% intervals do not overlap (None: a score or an interval is missing)."""
    if a.get("score") is None or b.get("score") is None or None in (a.get("score_ci_low"), a.get("score_ci_high"),
                                                                     b.get("score_ci_low"), b.get("score_ci_high")):
        return None
    return a["score_ci_high"] < b["score_ci_low"] or b["score_ci_high"] < a["score_ci_low"]


def _dream_noise(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How much a target's best dream activation moves by chance: the larger seed spread of the two
    nights (max − min of the per-seed best), at least DREAM_NOISE_REL of the larger maximum."""
    spreads = [r["seed_max_max"] - r["seed_max_min"] for r in (a, b)
               if r.get("seed_max_max") is not None and r.get("seed_max_min") is not None and (r.get("n_seeds") or 0) > 1]
    ref = max(abs(a.get("dream_max") or 0.0), abs(b.get("dream_max") or 0.0))
    return max(spreads + [DREAM_NOISE_REL * ref])


def _fmt(x: Any) -> str | None:
    if x is None:
        return None
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _score_text(r: dict[str, Any]) -> str | None:
    if r.get("score") is None:
        return None
    ci = f" [{r['score_ci_low']:.3f}, {r['score_ci_high']:.3f}]" if r.get("score_ci_low") is not None and r.get("score_ci_high") is not None else ""
    return f"{r['score']:.3f}{ci}"


def diff_runs(store: Store, run_a: str, run_b: str) -> list[dict[str, Any]]:
    """What changed from night ``run_a`` to night ``run_b``, from their ``atlas_latents`` rows.

    Kinds: ``new`` (a target of B never seen on a night before B), ``returning`` (a target of B that
    A did not have but an earlier night did), ``changed`` (a target of both whose best
    dream maximum moved beyond noise — the larger seed spread, at least 5% —, whose verdict or
    explanation text changed, or whose score's 95% intervals do not overlap), ``regression``
    (such a change for the worse — dominance lost, dream maximum or score down beyond noise —
    when the model/SAE/dream fingerprint changed between the nights), and ``fingerprint``
    (run-level: a configuration section whose settings differ, target_id '*').

    Returns:
        ``night_diffs`` rows (without ``created_at``).
    Raises:
        ReverieError: a run has no atlas rows (render its report first: ``reverie report --run``).
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in (run_a, run_b):
        rows[run] = store.fetch("SELECT * FROM atlas_latents WHERE run_id = ?", [run])
        if not rows[run]:
            known = store.fetch_one("SELECT run_id FROM runs WHERE run_id = ?", [run])
            raise ReverieError(f"run {run!r} " + ("has no atlas rows: render its report first (reverie report --run " + run + ")"
                                                  if known else f"is not in {store.path}"))
    a = {(r["sae_key"], r["target_id"]): r for r in rows[run_a]}
    b = {(r["sae_key"], r["target_id"]): r for r in rows[run_b]}
    out: list[dict[str, Any]] = []
    earlier: dict[tuple[str, str], list[str]] = {}  # targets of B seen on nights that started before B
    for r in store.fetch("SELECT a.sae_key, a.target_id, a.run_id FROM atlas_latents a WHERE a.run_id <> ? AND a.started_at < "
                         "(SELECT min(started_at) FROM atlas_latents WHERE run_id = ?) ORDER BY a.started_at", [run_b, run_b]):
        earlier.setdefault((r["sae_key"], r["target_id"]), []).append(r["run_id"])

    def add(key: tuple[str, str], kind: str, field: str, before: Any, after: Any, detail: str | None) -> None:
        out.append({"run_a": run_a, "run_b": run_b, "sae_key": key[0], "target_id": key[1], "kind": kind, "field": field,
                    "before": _fmt(before), "after": _fmt(after), "detail": detail})

    for fc in fingerprint_changes(store, run_a, run_b):
        add(("*", "*"), "fingerprint", fc["section"], fc["before"], fc["after"], "changed: " + ", ".join(fc["keys"]))
    for key, rb in sorted(b.items()):
        ra = a.get(key)
        if ra is None:
            seen = earlier.get(key)
            if seen:
                add(key, "returning", "target", None, rb["verdict"], f"not in {run_a}; seen before on {', '.join(seen)}")
            else:
                add(key, "new", "target", None, rb["verdict"], f"first seen in {run_b}")
            continue
        fp_changed = (ra["dream_fp"] != rb["dream_fp"] or ra["model_key"] != rb["model_key"]) and ra["dream_fp"] is not None
        why_fp = "; fingerprint changed (model/SAE/objective/EPO settings)" if fp_changed else ""
        # best dream
        if ra["dream_max"] is not None and rb["dream_max"] is not None:
            noise, delta = _dream_noise(ra, rb), rb["dream_max"] - ra["dream_max"]
            if abs(delta) > noise:
                worse = delta < 0
                add(key, "regression" if (worse and fp_changed) else "changed", "best_dream", ra["dream_max"], rb["dream_max"],
                    f"dream max {'down' if worse else 'up'} {abs(delta):.4g} > noise {noise:.4g}{why_fp}; best dream now: {rb['best_dream'] or '—'}")
        if (ra["verdict"] or None) != (rb["verdict"] or None):
            worse = bool(ra["dominates"]) and not rb["dominates"]
            add(key, "regression" if (worse and fp_changed) else "changed", "verdict", ra["verdict"], rb["verdict"],
                ("dominance lost" if worse else "verdict changed") + why_fp)
        if ra["explanation"] and rb["explanation"] and ra["explanation"] != rb["explanation"]:
            add(key, "changed", "explanation", ra["explanation"], rb["explanation"], "explanation text changed")
        apart = _ci_apart(ra, rb)
        if apart:
            worse = rb["score"] < ra["score"]
            add(key, "regression" if (worse and fp_changed) else "changed", "score", _score_text(ra), _score_text(rb),
                f"95% intervals do not overlap ({rb['score_metric'] or 'score'}){why_fp}")
    return out


def record_diff(store: Store, run_a: str, run_b: str) -> list[dict[str, Any]]:
    """Compute :func:`diff_runs` and store it in ``night_diffs`` (replacing an earlier diff of the same pair).

    Returns:
        The rows stored.
    Raises:
        ReverieError: see :func:`diff_runs`; StoreWriteError: the database cannot be written.
    """
    rows = [{**r, "created_at": now()} for r in diff_runs(store, run_a, run_b)]
    store.replace("night_diffs", {"run_a": run_a, "run_b": run_b}, rows)
    return rows


def previous_night(store: Store, run_id: str) -> str | None:
    """The latest nightly run that started before ``run_id`` and has atlas rows, or None."""
    row = store.fetch_one(
        "SELECT r.run_id FROM runs r WHERE r.kind = 'nightly' AND r.run_id <> ? AND r.started_at < (SELECT started_at FROM runs WHERE run_id = ?) "
        "AND EXISTS (SELECT 1 FROM atlas_latents a WHERE a.run_id = r.run_id) ORDER BY r.started_at DESC LIMIT 1", [run_id, run_id])
    return row["run_id"] if row else None


def diff_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A stored or computed diff as plain-text lines (one per row), grouped by kind."""
    order = {"fingerprint": 0, "regression": 1, "new": 2, "returning": 3, "changed": 4}
    lines = []
    for r in sorted(rows, key=lambda r: (order.get(r["kind"], 9), r["sae_key"], r["target_id"], r["field"])):
        what = f"{r['kind']:<11} {r['target_id']:<10} {r['field']}"
        change = "" if r["kind"] in ("new", "returning") else f": {r['before'] or '—'} → {r['after'] or '—'}"
        lines.append(f"{what}{change}" + (f" ({r['detail']})" if r.get("detail") else ""))
    return lines


# ---------------------------------------------------------------------------- atlas pages
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


def _clean(obj: Any) -> Any:
    from reverie.reports.render import clean_text

    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, list):
        return [_clean(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def index_script(entries: list[dict[str, Any]]) -> str:
    """The text of ``atlas-index.js``: ``window.REVERIE_ATLAS = <JSON>;``.

    Every string passes :func:`reports.render.clean_text` and the JSON is pure ASCII (``\\uXXXX``
    escapes, ``<`` ``>`` ``&`` included), so no text from a corpus, a model or an LLM can end the
    literal or the script.
    """
    body = json.dumps({"version": 1, "entries": _clean(entries)}, ensure_ascii=True, sort_keys=True, default=str)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"window.REVERIE_ATLAS = {body};\n"


def _atlas_csp(script_hashes: list[str]) -> str:
    """The atlas page's CSP: the per-night pages' policy plus scripts from the report folder
    (``'self'``: only ``atlas-index.js`` is referenced)."""
    from reverie.reports.render import _csp

    return _csp(["'self'", *script_hashes])


def render_atlas(cfg: ReverieConfig, store: Store) -> Path:
    """Write the atlas (``index.html``, ``atlas-index.js``, ``report.css``) and every night's diff
    page into ``<project>/reports/``.

    Returns:
        Path of the atlas ``index.html``.
    Raises:
        OSError: the folder cannot be written.
    """
    from reverie.reports.render import _csp, _script, fmt_time, make_env

    out = atlas_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env()
    entries, nights = atlas_entries(store)
    with resources.as_file(resources.files("reverie.reports") / "templates" / "report.css") as css:
        shutil.copyfile(css, out / "report.css")
    (out / ATLAS_JS).write_text(index_script(entries), encoding="utf-8")
    js, js_hash = _script(env, "atlas_script.html")
    generated = fmt_time(dt.datetime.now(dt.timezone.utc))
    for n in nights:
        n["index"] = _rel(_night_index(cfg, n["run_id"]), out)
        n["diff_page"] = f"diff-{_safe(n['run_id'])}.html"
    saes = sorted({e["sae"] for e in entries})
    verdicts = sorted({e["verdict"] for e in entries if e["verdict"]})
    html = env.get_template("atlas.html").render(
        csp=_atlas_csp([js_hash]), atlas_js=js, entries=entries, nights=nights, saes=saes, verdicts=verdicts, generated=generated,
        data_file=ATLAS_JS)
    (out / "index.html").write_text(html, encoding="utf-8")
    page = env.get_template("diff.html")
    for n in nights:
        rows = store.fetch("SELECT * FROM night_diffs WHERE run_b = ? ORDER BY kind, sae_key, target_id, field", [n["run_id"]])
        pages = {(r["sae_key"], r["target_id"]): r["page"] for r in store.fetch(
            "SELECT sae_key, target_id, page FROM atlas_latents WHERE run_id = ?", [n["run_id"]])}
        for r in rows:
            r["page"] = pages.get((r["sae_key"], r["target_id"]))
        run_a = rows[0]["run_a"] if rows else previous_night(store, n["run_id"])
        (out / n["diff_page"]).write_text(page.render(
            csp=_csp([]), night=n, run_a=run_a, rows=rows, generated=generated,
            kinds=[("regression", "Regressions (fingerprint changed, result worse)"), ("new", "New this night (never seen before)"),
                   ("returning", "Back from an earlier night"), ("changed", "Changed beyond noise"), ("fingerprint", "Configuration changes")]), encoding="utf-8")
    return out / "index.html"


def _safe(run_id: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", run_id)


def _night_index(cfg: ReverieConfig, run_id: str) -> Path:
    from reverie.reports.render import default_out_dir

    return default_out_dir(cfg, run_id) / "index.html"


def other_nights(cfg: ReverieConfig, store: Store, run_id: str, sae_key: str, target_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """The same target's pages on other nights (atlas rows), as ``{"run", "night", "href", "verdict"}``
    with ``href`` relative to ``out_dir`` (the page being rendered), oldest first."""
    if "atlas_latents" not in store.tables():  # a database older than migration 0011, opened read-only
        return []
    rows = store.fetch("SELECT run_id, night, page, verdict FROM atlas_latents WHERE sae_key = ? AND target_id = ? AND run_id <> ? "
                       "ORDER BY started_at, run_id", [sae_key, target_id, run_id])
    return [{"run": r["run_id"], "night": r["night"], "verdict": r["verdict"],
             "href": _rel(atlas_dir(cfg) / r["page"], out_dir)} for r in rows]


def update_atlas(cfg: ReverieConfig, store: Store, run_id: str) -> Path:
    """A night's atlas unit: store its summary rows, its diff against the previous night (when there
    is one), and re-render the atlas.

    Returns:
        Path of the atlas ``index.html``.
    Raises:
        ReverieError: no such run; StoreWriteError / OSError: the database or the folder cannot be written.
    """
    with store.transaction():
        record_night(cfg, store, run_id)
        prev = previous_night(store, run_id)
        if prev:
            record_diff(store, prev, run_id)
    return render_atlas(cfg, store)
