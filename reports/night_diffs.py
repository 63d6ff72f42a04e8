"""Night-to-night diffs of the atlas (issue 15): what changed from one night to the next, from
their ``atlas_latents`` rows (``night_diffs``; :func:`diff_runs`, :func:`record_diff`).
"""

from __future__ import annotations

import json
from typing import Any

from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store, now

#: config sections whose change between two nights makes their results not comparable
FINGERPRINT_SECTIONS = ("model", "sae", "targets", "dream", "scan", "compare", "explain")
#: keys that change from night to night by design (not a fingerprint change)
_VOLATILE_KEYS = {("targets", "seed"), ("targets", "n_random"), ("targets", "latents"), ("targets", "combinations"),
                  ("targets", "allow_repeats"), ("model", "device"), ("explain", "max_concurrency")}
#: relative change of a dream maximum below which it is noise when a target has a single seed
DREAM_NOISE_REL = 0.05


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
