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

The rows live in :mod:`reports.atlas_rows`, the diffs in :mod:`reports.night_diffs`; this module
renders the site.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.store import Store
from reverie.reports.atlas_rows import atlas_dir, atlas_entries, other_nights, record_night, rel_path
from reverie.reports.night_diffs import diff_lines, diff_runs, previous_night, record_diff

# re-exported: the CLI, the orchestrator, retention, render.py and the tests import these from here
__all__ = ["atlas_dir", "diff_lines", "diff_runs", "index_script", "other_nights", "record_diff", "record_night", "render_atlas",
           "update_atlas"]

ATLAS_JS = "atlas-index.js"


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
        n["index"] = rel_path(_night_index(cfg, n["run_id"]), out)
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
