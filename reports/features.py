"""The feature panel of a latent page (issue 12): the decoder direction's logit lens and the
latent's neighbours, read from ``logit_lens`` and ``latent_neighbours`` (written by
:mod:`stages.features` and the scan). Read only; an older database without those tables gives
empty panels.

Links: a neighbour links to its single-latent page when some run of the same SAE has a target for
it and that page exists (this run's page, else another run's rendered in its default report folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reverie.pipeline.store import Store


@dataclass
class LogitLens:
    """One latent's logit lens: top/bottom tokens (display pieces) with logits, and the histogram
    of all d_vocab logits (edges, counts); ``norm_scale`` says how the final norm entered."""

    latent: int
    norm_scale: str
    d_vocab: int
    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]
    hist_edges: list[float]
    hist_counts: list[int]
    mean: float | None
    std: float | None

    def rows(self) -> list[tuple[tuple[str, float], tuple[str, float]]]:
        """Table rows: the i-th most promoted token beside the i-th most suppressed one."""
        return list(zip(self.top, self.bottom))

    def bars(self) -> list[dict[str, Any]]:
        """Histogram bars for the page: height in percent of the tallest bin (non-empty bins at least 2%)."""
        top = max(self.hist_counts, default=0) or 1
        return [{"h": 0 if c == 0 else max(2.0, 100.0 * c / top), "count": int(c), "lo": lo, "hi": hi}
                for c, lo, hi in zip(self.hist_counts, self.hist_edges, self.hist_edges[1:])]


@dataclass
class Neighbour:
    """A similar latent: ``value`` is the decoder cosine or the co-occurrence Jaccard index."""

    latent: int
    value: float
    n_both: int | None = None
    n_latent: int | None = None
    n_neighbour: int | None = None
    href: str | None = None


@dataclass
class FeaturePanel:
    """Everything the page shows about one (member) latent's weights and neighbours."""

    latent: int
    lens: LogitLens | None = None
    cosine: list[Neighbour] = field(default_factory=list)
    cooccurrence: list[Neighbour] = field(default_factory=list)
    cooc_window: int | None = None
    n_cooc_windows: int | None = None


def _page_href(store: Store, sae_key: str, latent: int, run_id: str, out: Path,
               page_name: Callable[[str], str], run_dir: Callable[[str], Path]) -> str | None:
    rows = store.fetch("SELECT DISTINCT run_id FROM targets WHERE target_id = ? AND sae_key = ?", [str(latent), sae_key])
    runs = [r["run_id"] for r in rows]
    if run_id in runs:
        return page_name(str(latent))
    for other in sorted(runs, reverse=True):
        path = run_dir(other) / page_name(str(latent))
        if path.exists():
            return Path(os.path.relpath(path, out)).as_posix()
    return None


def load_panels(store: Store, td: Any, run_id: str, out: Path, page_name: Callable[[str], str],
                run_dir: Callable[[str], Path]) -> list[FeaturePanel]:
    """One :class:`FeaturePanel` per latent of a target (per member for a combination).

    Args:
        td: the page's :class:`reports.data.TargetData` (latents, sae_key, model_key, scan).
        out: this run's report folder (links are relative to it).
        page_name: target id → page file name. run_dir: run id → that run's report folder.
    """
    tables = set(store.tables())
    panels = []
    scan_id = td.scan.scan_id if getattr(td, "scan", None) else None
    scan = store.fetch_one("SELECT cooc_window, n_cooc_windows FROM scans WHERE scan_id = ?", [scan_id]) if scan_id and "logit_lens" in tables else None
    for lat in td.latents:
        p = FeaturePanel(latent=int(lat))
        if "logit_lens" in tables:
            r = store.fetch_one("SELECT * FROM logit_lens WHERE sae_key = ? AND model_key = ? AND latent = ? ORDER BY created_at DESC LIMIT 1",
                                [td.sae_key, td.model_key, int(lat)])
            if r:
                p.lens = LogitLens(int(lat), r["norm_scale"], int(r["d_vocab"]), list(zip(r["top_tokens"], r["top_logits"])),
                                   list(zip(r["bottom_tokens"], r["bottom_logits"])), list(r["hist_edges"]), [int(c) for c in r["hist_counts"]],
                                   r["mean"], r["std"])
        if "latent_neighbours" in tables:
            for kind, source in (("decoder_cosine", td.sae_key), ("cooccurrence", scan_id)):
                if source is None:
                    continue
                nbs = [Neighbour(int(r["neighbour"]), float(r["value"]), r["n_both"], r["n_latent"], r["n_neighbour"],
                                 _page_href(store, td.sae_key, int(r["neighbour"]), run_id, out, page_name, run_dir))
                       for r in store.fetch("SELECT * FROM latent_neighbours WHERE source_id = ? AND kind = ? AND latent = ? ORDER BY rank",
                                            [source, kind, int(lat)])]
                setattr(p, "cosine" if kind == "decoder_cosine" else "cooccurrence", nbs)
        if scan:
            p.cooc_window, p.n_cooc_windows = scan["cooc_window"], scan["n_cooc_windows"]
        panels.append(p)
    return panels
