"""The report's matplotlib figures, written as PNG files next to the pages.

Uses the Agg backend through ``matplotlib.figure.Figure`` directly (no pyplot global state),
so figures are independent and nothing opens a window. Each function returns the written
path, or ``None`` when its data is absent (the page then says so instead of showing a plot).

Units: activation = the objective's value (the latent quantity the targets section chose);
CE = mean self-cross-entropy in nats/token.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from reverie.reports.views import TargetData  # noqa: E402

DPI = 110
SIZE = (6.0, 4.0)
SEED_COLORS = ("#d9480f", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5f3dc4")


STYLE = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "legend.fontsize": 9, "xtick.labelsize": 10, "ytick.labelsize": 10}


def _styled(fn):
    """Run a plot function under the report's matplotlib style (larger fonts: figures are
    shown about 560 px wide)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _ce_lines(ax, ce_limit: float | None, in_dist: float | None, bands: dict | None = None) -> None:
    bands = bands or {}
    if _finite(in_dist):
        ax.axvline(in_dist, color="black", lw=1.2, label=f"corpus mean + 2σ: {in_dist:.3g}")
    p10, p50 = bands.get("p10"), bands.get("p50")
    if _finite(p50):
        ax.axvline(p50, color="0.35", lw=1.0, ls=":", label=f"corpus median: {p50:.3g}")
    if _finite(p10):
        ax.axvline(p10, color="0.35", lw=1.0, ls="-.", label=f"corpus 10th pct.: {p10:.3g}")
    if _finite(ce_limit) and not any(_finite(x) and abs(x - ce_limit) < 1e-9 for x in (p10, p50, in_dist)):
        ax.axvline(ce_limit, color="0.45", lw=1.0, ls="--", label=f"CE limit {ce_limit:.3g}")


@_styled
def activation_vs_ce(td: TargetData, path: Path, ce_limit: float | None, in_dist: float | None, bands: dict | None = None,
                     convention: str = "all") -> Path | None:
    """Paper Fig. 3 for one target: each seed's Pareto-frontier prompts (activation vs CE,
    joined in CE order) and the dataset's top-k windows fed alone (a single latent:
    ``scan_examples.window_ce`` / ``window_act``; a combination: the combined objective on its
    latents' top windows, ``scan_objective_examples``), with the in-distribution CE threshold
    (corpus window CE mean + 2σ) as a black vertical line, the corpus median and 10th percentile
    dotted, and the searched dataset frontier (every matched-length window of the top contexts,
    ``scan_windows``) as a grey staircase. The x axis is the verdict's CE convention
    (``convention`` 'rest' = without the first token, 'all' = all n tokens); a dream without a
    stored ``ce_rest`` is placed by its all-token CE only when the convention is 'all'.

    Returns:
        ``path`` once written; None when there are neither dream prompts nor dataset windows.
    """
    rest = convention == "rest"
    by_seed: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for p in td.prompts:
        ce = p.ce_rest if rest else p.ce
        if _finite(ce) and _finite(p.activation):
            by_seed[p.seed].append((ce, p.activation))
    if td.is_combination:
        data = [(c, a) for c, a in td.objective_windows if _finite(c) and _finite(a)] if not rest else []
    else:
        data = [((e.window_ce_rest if rest else e.window_ce), e.window_act) for ls in td.latent_scans for e in ls.top
                if _finite(e.window_ce_rest if rest else e.window_ce) and _finite(e.window_act)]
    front = sorted((w.ce_rest if rest else w.ce, w.act) for w in td.data_windows
                   if (w.frontier_rest if rest else w.frontier_all) and _finite(w.ce_rest if rest else w.ce))
    if not by_seed and not data and not front:
        return None
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    if data:
        ax.scatter([c for c, _ in data], [a for _, a in data], marker="x", s=22, color="0.25", lw=1, label=f"dataset top {len(data)} (window at the max token, alone)", zorder=2)
    if front:
        ax.plot([c for c, _ in front], [a for _, a in front], "s--", ms=3.5, lw=1, color="0.15", label=f"dataset frontier ({len(front)} searched windows)", zorder=2)
    for i, (seed, pts) in enumerate(sorted(by_seed.items())):
        pts.sort()
        color = SEED_COLORS[i % len(SEED_COLORS)]
        ax.plot([c for c, _ in pts], [a for _, a in pts], "o-", ms=4, lw=1, color=color, alpha=0.9, label=f"dream frontier, seed {seed}", zorder=3)
    _ce_lines(ax, ce_limit, in_dist, bands)
    ax.set_xlabel("cross-entropy without the first token (nats/token)" if rest else "cross-entropy, all tokens (nats/token)")
    ax.set_ylabel("activation" + (f" ({td.combine} of latents)" if td.is_combination else ""))
    ax.set_title(f"Activation vs cross-entropy — target {td.target_id}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


@_styled
def frontier_evolution(td: TargetData, path: Path) -> Path | None:
    """Paper Fig. 2b: the Pareto frontier recorded every few iterations of one EPO run (the
    seed holding the best prompt), coloured from early (dark) to late (yellow).

    Returns:
        ``path`` once written; None without ``dream_history`` rows.
    """
    if not td.history:
        return None
    best_seed = max(td.prompts, key=lambda p: p.activation).seed if td.prompts else td.history[0].seed
    hist = [h for h in td.history if h.seed == best_seed] or td.history
    by_it: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for h in hist:
        if _finite(h.ce) and _finite(h.activation):
            by_it[h.iteration].append((h.ce, h.activation))
    if not by_it:
        return None
    its = sorted(by_it)
    norm = Normalize(vmin=its[0], vmax=max(its[-1], its[0] + 1))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    for it in its:
        pts = sorted(by_it[it])
        ax.plot([c for c, _ in pts], [a for _, a in pts], "o-", ms=3, lw=1.2, color=cmap(norm(it)))
    if len(its) > 1:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="iteration")
    else:  # one recorded frontier (runs shorter than dream.history_every): no colour scale to show
        ax.lines[0].set_label(f"frontier at iteration {its[0]}")
        ax.legend()
    ax.set_xlabel("cross-entropy (nats/token)")
    ax.set_ylabel("activation")
    ax.set_title(f"Frontier evolution — target {td.target_id}, seed {best_seed}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


@_styled
def activation_histograms(td: TargetData, path: Path) -> Path | None:
    """The scan's activation histogram of each latent (log count), with the dataset maximum
    (dotted) and the dream maximum (red) marked. For a combination the dream maximum of latent
    j is the best ``latent_acts[j]`` over frontier prompts.

    Returns:
        ``path`` once written; None when no latent has a stored histogram.
    """
    panels = [ls for ls in td.latent_scans if ls.hist_edges and ls.hist_counts and len(ls.hist_edges) == len(ls.hist_counts) + 1]
    if not panels:
        return None
    fig = Figure(figsize=(SIZE[0], 2.6 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, ls in zip(axes, panels):
        j = td.latents.index(ls.latent)
        if td.is_combination:
            vals = [p.latent_acts[j] for p in td.prompts if p.latent_acts and len(p.latent_acts) > j and _finite(p.latent_acts[j])]
            dream_max = max(vals, default=None)
        else:
            dream_max = td.dream_max
        counts = [max(int(c), 0) for c in ls.hist_counts]
        if any(c > 0 for c in counts):
            # log scale: bars start at 0.5 so a bin holding one token is a visible bar (height 1 > floor),
            # and every non-empty bin also gets a marker, however narrow it is at this width
            ax.set_yscale("log")
            ax.stairs([c if c > 0 else 0.5 for c in counts], ls.hist_edges, baseline=0.5, fill=True, color="#74c0fc", edgecolor="#1c7ed6")
            mids = [(ls.hist_edges[k] + ls.hist_edges[k + 1]) / 2 for k, c in enumerate(counts) if c > 0]
            ax.plot(mids, [c for c in counts if c > 0], "v", ms=3.5, color="#1c7ed6", label="non-empty bin")
            ax.set_ylim(0.5, max(counts) * 2.0)
        else:
            ax.stairs(counts, ls.hist_edges, fill=True, color="#74c0fc", edgecolor="#1c7ed6")
        if _finite(ls.max_act):
            ax.axvline(ls.max_act, color="0.2", ls=":", lw=1.5, label=f"dataset max (in context) {ls.max_act:.3g}")
        if _finite(ls.window_max):
            ax.axvline(ls.window_max, color="0.2", ls="--", lw=1.2, label=f"dataset max (window alone) {ls.window_max:.3g}")
        if _finite(dream_max):
            ax.axvline(dream_max, color="#e03131", lw=2, label=f"dream max {dream_max:.3g}")
        ax.set_xlabel(f"latent {ls.latent} activation (firing tokens)")
        ax.set_ylabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.suptitle(f"Dataset activation histogram — target {td.target_id}")
    return _save(fig, path)


@_styled
def ratio_distribution(targets: list[TargetData], path: Path) -> Path | None:
    """Batch plot: histogram of dream max / dataset max over the run's targets, with the
    parity line at 1 and each target as a tick below.

    Returns:
        ``path`` once written; None when no target has a finite ratio.
    """
    # single latents only: a combination's value is not in any latent's units and is never mixed in
    ratios = [t.comparison.ratio for t in targets if t.comparison and not t.is_combination and _finite(t.comparison.ratio)]
    if not ratios:
        return None
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    bins = max(5, min(30, len(ratios)))
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    pad = 0.05 * (hi - lo or 1.0)
    ax.hist(ratios, bins=bins, range=(lo - pad, hi + pad), color="#ffa94d", edgecolor="#d9480f")
    ax.plot(ratios, [0] * len(ratios), "|", color="black", ms=14, mew=1.2, clip_on=False)
    ax.axvline(1.0, color="black", lw=1.2, label="dream max = dataset max")
    ax.set_xlabel("dream max / dataset max (window alone), single latents")
    ax.set_ylabel("targets")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Dream vs dataset maximum ({len(ratios)} targets)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


@_styled
def beats_fraction(targets: list[TargetData], path: Path) -> Path | None:
    """Batch plot over single-latent targets: the fraction where a dream dominates the dataset's best
    matched window (the primary verdict), where the dream max beats the dataset max, and where the
    best dream beats the best window at CE ≤ mean + 2σ (bars in [0, 1] labelled k / n; NULL
    states are left out of n).

    Returns:
        ``path`` once written; None when no single latent has a comparison.
    """
    comps = [t.comparison for t in targets if t.comparison and not t.is_combination]
    if not comps:
        return None
    rows = []
    for label, attr in (("dominates best window", "dominates"), ("dream max > data max", "beats_data"),
                        ("beats at CE ≤ mean+2σ", "beats_data_in_dist")):
        known = [getattr(c, attr) for c in comps if getattr(c, attr) is not None]
        if known:
            rows.append((label, sum(bool(x) for x in known), len(known)))
    if not rows:
        return None
    fig = Figure(figsize=(SIZE[0], 1.4 + 0.8 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [k / n for _, k, n in rows], color="#69db7c", edgecolor="#2b8a3e", height=0.6)
    for y, (_, k, n) in zip(ys, rows):
        ax.text(min(k / n, 0.85) + 0.02, y, f"{k} / {n}", va="center")
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of targets")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
