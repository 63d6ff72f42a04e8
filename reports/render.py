"""Render a run's static HTML report: ``index.html`` plus one page per target, offline.

Layout of the output folder: ``index.html``, ``report.css``, ``latent-<id>.html`` per target
(a combination '12+345' gets ``latent-12_345.html``) and the PNG plots next to them. Pages
need no network: no CDN, fonts or external scripts; the one inline script (table sorting) is
optional and allowed by a Content-Security-Policy hash, so no other script can run.

All model and dataset text is untrusted. Jinja2 autoescape is on, and every ``{{ … }}`` output
passes :func:`clean_text` first, which turns control and bidirectional-override characters
into visible escapes (``\\x1b``, ``\\u202e``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import math
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.lookup import latest_run
from reverie.pipeline.paths import expand
from reverie.pipeline.store import Store
from reverie.reports import plots
from reverie.reports.features import load_panels
from reverie.reports.data import dream_beats_dataset, load_run
from reverie.reports.views import DreamPromptView, ExampleView, RunData, TargetData

NEURONPEDIA = "https://www.neuronpedia.org"
FIG3_TOP = 64
_BIDI = {0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF}


# ---------------------------------------------------------------------------- text safety
def clean_text(value: Any) -> Any:
    """Make untrusted text safe to show: control characters (C0/C1 except newline and tab)
    and bidirectional overrides/isolates become visible escapes (``\\x00``, ``\\u202e``).

    Markup (trusted HTML built by this module) and non-strings pass through unchanged.
    HTML escaping is separate: Jinja2's autoescape does it after this.
    """
    if not isinstance(value, str) or isinstance(value, Markup):
        return value
    out = []
    for ch in value:
        o = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif o < 0x20 or 0x7F <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif o in _BIDI or unicodedata.category(ch) == "Cs":
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def show_token(tok: str) -> str:
    """A token string for display: newline as '↵', tab as '⇥', empty as '∅' (spaces kept)."""
    if tok == "":
        return "∅"
    return tok.replace("\n", "↵").replace("\t", "⇥")


# ---------------------------------------------------------------------------- formatting
def fmt_num(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; '—' for None/NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def fmt_seconds(s: float | None) -> str:
    """Wall time as '12.3 s', '4 min 05 s' or '2 h 03 min'."""
    if s is None or not math.isfinite(s):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_time(t: Any) -> str:
    """A timestamp as 'YYYY-mm-dd HH:MM:SS UTC'."""
    if isinstance(t, dt.datetime):
        return t.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "—" if t is None else str(t)


def sort_key(x: Any) -> str:
    """``data-sort`` attribute value of a table cell: numbers as repr, booleans 1/0, None ''."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, bool):
        return "1" if x else "0"
    return repr(x) if isinstance(x, (int, float)) else str(x)


def page_name(target_id: str) -> str:
    """File name of a target's page: 'latent-123.html', 'latent-12_345.html'."""
    return f"latent-{re.sub(r'[^0-9A-Za-z_-]', '_', target_id)}.html"


# ---------------------------------------------------------------------------- token views
@dataclass
class TokenCell:
    """One shaded token: display text, inline style, tooltip, whether it is the max token."""

    text: str
    style: str
    title: str
    is_max: bool = False


def shade(act: float | None, scale: float, zero: float = 0.0) -> str:
    """CSS background for an activation: orange with alpha = (act − zero) / (scale − zero) above
    ``zero``, none at or below it. ``zero`` is where "no signal" sits: 0 for post-activations,
    the random-prompt mean for pre-activations and projections (which have no natural zero)."""
    if act is None or not math.isfinite(act) or scale <= zero or act <= zero:
        return ""
    return f"background-color: rgba(255, 122, 0, {min((act - zero) / (scale - zero), 1.0):.3f})"


def token_cells(tokens: list[str], acts: list[float] | None, scale: float, max_pos: int | None = None,
                zero: float = 0.0) -> list[TokenCell]:
    """Shaded tokens of a dream or dataset example (activation per token in the tooltip)."""
    cells = []
    for i, tok in enumerate(tokens):
        act = acts[i] if acts is not None and i < len(acts) else None
        title = f"{tok!r}  activation {fmt_num(act, 4)}" + ("  (max)" if i == max_pos else "")
        cells.append(TokenCell(text=show_token(tok), style=shade(act, scale, zero), title=title, is_max=i == max_pos))
    return cells


def _scale(values: list[list[float] | None]) -> float:
    """Full-colour activation of a section: its largest positive value (1.0 when none)."""
    m = max((v for vs in values if vs for v in vs if v is not None and math.isfinite(v)), default=0.0)
    return m if m > 0 else 1.0


def random_mean(td) -> float:
    """The random-prompt mean of the target's dreamed objective (paper §3.5 baseline), 0 when the
    scan has none: the anchor of dream shading and attribution bars."""
    keys = {d.objective_key for d in td.dream_runs if d.objective_key}
    return next((b.mean for b in td.baselines if b.objective_key in keys and math.isfinite(b.mean)), 0.0)


@dataclass
class AttrCell:
    """One token of the attribution view (paper Fig. 1): bar height (drop to the best
    alternative / prompt activation) and colour (drop from the worst substitution / activation)."""

    text: str
    bar_pct: float
    style: str
    title: str


def attribution_cells(p: DreamPromptView, zero: float = 0.0) -> list[AttrCell]:
    """Attribution view of a frontier prompt: colour = drop_worst, bar height = drop_best,
    both relative to how far the prompt's activation is above ``zero`` (the random-prompt mean:
    a drop to the random level is full colour) and clipped to [0, 1]; tooltip = top replacements."""
    ref = (p.activation - zero) if p.activation - zero > 1e-9 else (abs(p.activation) or 1.0)
    cells = []
    for a in p.attribution or []:
        worst = min(max(a.drop_worst / ref, 0.0), 1.0) if math.isfinite(a.drop_worst) else 0.0
        best = min(max(a.drop_best / ref, 0.0), 1.0) if math.isfinite(a.drop_best) else 0.0
        reps = "\n".join(f"  {tok!r} → {fmt_num(act, 4)}" for tok, act in a.replacements[:8])
        title = (f"{a.token!r} at position {a.position}\n"
                 f"drop from worst substitution: {fmt_num(a.drop_worst, 4)}\n"
                 f"drop from best alternative: {fmt_num(a.drop_best, 4)}\n"
                 f"top replacements (activation):\n{reps or '  none stored'}")
        cells.append(AttrCell(text=show_token(a.token), bar_pct=round(100 * best, 1),
                              style=f"background-color: rgba(224, 49, 49, {worst:.3f})", title=title))
    return cells


# ---------------------------------------------------------------------------- environment
def make_env() -> Environment:
    """The Jinja2 environment: package templates, autoescape on for every template, every
    output cleaned by :func:`clean_text`, undefined names are errors."""
    env = Environment(loader=PackageLoader("reverie.reports", "templates"), autoescape=True, finalize=clean_text,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt_num, seconds=fmt_seconds, time=fmt_time, sortkey=sort_key, tok=show_token, page=page_name, ppl=ppl)
    return env


def _script(env: Environment, name: str) -> tuple[Markup, str]:
    """An inline script's body (trusted, from the package) and its CSP hash source."""
    body = env.get_template(name).render()
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return Markup(body), f"'sha256-{digest}'"


def _csp(script_hashes: list[str]) -> str:
    """Content-Security-Policy of a page: nothing from the network; images and the stylesheet
    from the report folder; inline styles (token shading); only the listed inline scripts."""
    scripts = " ".join(script_hashes) or "'none'"
    return ("default-src 'none'; img-src 'self' file: data:; style-src 'self' file: 'unsafe-inline'; "
            f"script-src {scripts}; base-uri 'none'; form-action 'none'")


def neuronpedia_url(np_id: str | None, latent: int) -> str | None:
    """Neuronpedia page of a latent, e.g. https://www.neuronpedia.org/gpt2-small/6-res-jb/123."""
    return f"{NEURONPEDIA}/{quote(np_id.strip('/'), safe='/')}/{int(latent)}" if np_id else None


# ---------------------------------------------------------------------------- pages
CONVENTION_TEXT = {"rest": "CE without the first token (tokens 2..n; dreamy's convention)",
                   "all": "CE over all n tokens, each scored after BOS"}


def ppl(ce: Any) -> str:
    """Perplexity exp(CE) of a CE in nats/token, formatted ('—' when unknown)."""
    if ce is None or not isinstance(ce, (int, float)) or not math.isfinite(ce):
        return "—"
    return fmt_num(math.exp(ce)) if ce < 700 else "∞"


def member_view(td: TargetData, p: DreamPromptView) -> list[dict[str, Any]]:
    """Per member latent of a combination dream: its own activation and the ratio to that member's
    own dataset max (matched window fed alone; the in-context max when no window was searched)."""
    out = []
    for j, ls in enumerate(td.latent_scans):
        act = p.latent_acts[j] if p.latent_acts and j < len(p.latent_acts) else None
        ref = ls.window_max if ls.window_max is not None else None
        ratio = act / ref if act is not None and ref is not None and ref > 0 and math.isfinite(act) else None
        out.append({"latent": ls.latent, "act": act, "ref": ref, "ratio": ratio})
    return out


def _target_view(td: TargetData, cfg: ReverieConfig, run: RunData, out: Path) -> dict[str, Any]:
    """Template context of one target page (plots are written here)."""
    c = td.comparison
    conv = (c.ce_convention if c and c.ce_convention else None) or "all"
    bands = (td.scan.bands.get(conv) if td.scan else None) or {}
    ce_limit = c.metrics.get("ce_limit") if c and c.metrics.get("ce_limit") is not None else run.run.config_value("compare.ce_limit", cfg.compare.ce_limit)
    if isinstance(ce_limit, str):
        ce_limit = bands.get(ce_limit)
    in_dist = bands.get("in_dist")
    if in_dist is None:
        in_dist = td.scan.in_dist_threshold if td.scan and td.scan.in_dist_threshold is not None else (
            run.compare_summary.in_dist_threshold if run.compare_summary else None)
    stem = page_name(td.target_id)[: -len(".html")]
    figs = {
        "actce": plots.activation_vs_ce(td, out / f"{stem}-actce.png", ce_limit, in_dist, bands=bands, convention=conv),
        "evolution": plots.frontier_evolution(td, out / f"{stem}-evolution.png"),
        "hist": plots.activation_histograms(td, out / f"{stem}-hist.png"),
    }
    shown = td.prompts[: cfg.report.dreams_shown]
    dream_scale = _scale([p.token_acts for p in shown])
    zero = random_mean(td)
    dreams = [{"p": p, "cells": token_cells(p.tokens, p.token_acts, dream_scale,
                                            max_pos=(p.token_acts.index(max(p.token_acts)) if p.token_acts else None), zero=zero),
               "beats": dream_beats_dataset(td, p), "members": member_view(td, p) if td.is_combination else []}
              for p in shown]
    conv_windows = [w for w in td.data_windows if (w.frontier_rest if conv == "rest" else w.frontier_all)]
    attributed = [{"p": p, "cells": attribution_cells(p, zero)} for p in td.prompts if p.attribution]
    latents = []
    for ls in td.latent_scans:
        scale = _scale([e.acts for e in ls.top + ls.quantiles])

        def ex(e: ExampleView) -> dict[str, Any]:
            return {"e": e, "cells": token_cells(e.tokens, e.acts, scale, max_pos=e.max_pos)}

        latents.append({"ls": ls, "top": [ex(e) for e in ls.top[: cfg.report.examples_shown]], "quantiles": [ex(e) for e in ls.quantiles]})
    densities = [{"latent": lat, "log10": d, "np": neuronpedia_url(run.run.neuronpedia_id, lat)}
                 for lat, d in zip(td.latents, td.log10_density + [None] * (len(td.latents) - len(td.log10_density)))]
    return {
        "td": td, "figs": {k: (v.name if v else None) for k, v in figs.items()}, "dreams": dreams, "attributed": attributed,
        "latents": latents, "densities": densities, "ce_limit": ce_limit, "in_dist": in_dist, "dream_scale": dream_scale, "shade_zero": zero,
        "conv": conv, "conv_text": CONVENTION_TEXT.get(conv, conv), "bands": bands, "data_windows": conv_windows,
        "band_rows": (c.metrics.get("bands") if c else None) or [], "members": (c.metrics.get("members") if c else None) or [],
        "objective_scales": sorted({d.objective_scale for d in td.dream_runs if d.objective_scale}),
        "dream_unit": td.unit("dream"), "scan_unit": td.unit("scan"), "compare_unit": td.unit("compare"), "explain_unit": td.unit("explain"),
    }


def default_out_dir(cfg: ReverieConfig, run_id: str) -> Path:
    """``cfg.report.out`` when set, else ``<project dir>/reports/<run_id>``."""
    if cfg.report.out:
        return Path(expand(cfg.report.out)).resolve()
    return cfg.project.path / "reports" / re.sub(r"[^0-9A-Za-z_.-]", "_", run_id)


def render_reports(cfg: ReverieConfig, store: Store, run_id: str | None, out_dir: Path | None = None) -> Path:
    """Write a run's static report and return the path of its ``index.html``.

    Args:
        cfg: configuration (``report`` section: dreams/examples shown, output folder;
            ``compare.ce_limit`` when the run's stored config lacks it).
        store: the project's Store (only read).
        run_id: the run to report; None = the latest run with targets.
        out_dir: output folder (default :func:`default_out_dir`); created if missing, files
            of an earlier render are overwritten.
    Returns:
        Path of ``index.html``.
    Raises:
        ReverieError: the run does not exist (or the database has no runs).
    """
    run_id = run_id or latest_run(store, having="targets") or latest_run(store)
    if run_id is None:
        raise ReverieError(f"no runs in {store.path}: run `reverie targets` (or `reverie nightly`) first")
    out = Path(out_dir).resolve() if out_dir else default_out_dir(cfg, run_id)
    out.mkdir(parents=True, exist_ok=True)
    # the activation-vs-CE plot shows the top FIG3_TOP dataset windows (paper Fig. 3: top 64); tables show fewer
    run = load_run(store, run_id, n_top=max(cfg.report.examples_shown, FIG3_TOP), n_per_bin=2)
    env = make_env()
    with resources.as_file(resources.files("reverie.reports") / "templates" / "report.css") as css:
        shutil.copyfile(css, out / "report.css")
    sort_js, sort_hash = _script(env, "sort_script.html")
    common = {"run": run, "sort_js": sort_js, "csp": _csp([sort_hash]), "generated": fmt_time(dt.datetime.now(dt.timezone.utc))}
    page = env.get_template("latent.html")
    from reverie.reports.atlas import atlas_dir, other_nights

    atlas_href = Path(os.path.relpath(atlas_dir(cfg).resolve() / "index.html", out)).as_posix()
    for td in run.targets:
        panels = load_panels(store, td, run.run.run_id, out, page_name, lambda r: default_out_dir(cfg, r))
        nights = other_nights(cfg, store, run.run.run_id, td.sae_key, td.target_id, out)  # the same latent's pages on other nights
        html = page.render(**common, **_target_view(td, cfg, run, out), panels=panels, other_nights=nights, atlas_href=atlas_href)
        (out / page_name(td.target_id)).write_text(html, encoding="utf-8")
    figs = {"ratio": plots.ratio_distribution(run.targets, out / "index-ratio.png"),
            "beats": plots.beats_fraction(run.targets, out / "index-beats.png")}
    # batch numbers: single latents only (a combination's values are never mixed with single-latent ratios)
    comps = [t.comparison for t in run.targets if t.comparison and not t.is_combination]
    known = [c for c in comps if c.dominates is not None]
    in_known = [c for c in comps if c.beats_data_in_dist is not None]
    cs = run.compare_summary
    conv = (cs.ce_convention if cs and cs.ce_convention else None) or next((c.ce_convention for c in comps if c.ce_convention), None) or "all"
    scan = next((t.scan for t in run.targets if t.scan), None)
    index = env.get_template("index.html").render(
        **common, figs={k: (v.name if v else None) for k, v in figs.items()}, n_compared=len(comps),
        n_combos=sum(1 for t in run.targets if t.is_combination and t.comparison),
        n_beats=sum(1 for c in comps if c.beats_data), n_beats_in_dist=sum(1 for c in in_known if c.beats_data_in_dist),
        n_in_known=len(in_known), n_dominates=sum(1 for c in known if c.dominates), n_known=len(known),
        conv=conv, conv_text=CONVENTION_TEXT.get(conv, conv), bands=(scan.bands.get(conv) if scan else None) or {},
        ppl=ppl, member_view=member_view,
    )
    path = out / "index.html"
    path.write_text(index, encoding="utf-8")
    return path
