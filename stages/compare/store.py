"""The compare stage on the DuckDB store: read a run's dreams and a scan's rows, compare, write.

A thin persistence wrapper: rows are read here and handed to the same calls the library uses
(:func:`stages.compare.inputs.target_inputs`, :func:`stages.compare.result.compare_inputs`).
"""

from __future__ import annotations

from typing import Any, Sequence

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.store import Store
from reverie.sae_targets.spec import Target, target_objective_key
from reverie.stages.compare.core import TargetInputs
from reverie.stages.compare.inputs import target_inputs
from reverie.stages.compare.result import compare_inputs


def _columns(store: Store, table: str) -> set[str]:
    return {r["column_name"] for r in store.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])}


def load_inputs(cfg: ReverieConfig, store: Store, run_id: str, scan_id: str) -> tuple[dict[str, Any], list[TargetInputs]]:
    """Read a run's targets, dreams (all seeds), attributions and the scan's matched-length windows.

    What each side is: :func:`stages.compare.inputs.target_inputs`; ``ce_rest`` of dreams when
    ``dream_prompts`` has it.

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
    out = []
    for t in targets:
        target = Target(latents=[int(i) for i in t["latents"]], combine=t["combine"])
        key = target_objective_key(target, cfg.targets)

        def dataset(kind: str, key: str = key, target: Target = target) -> list[dict[str, Any]]:
            if kind == "windows":
                return store.fetch("SELECT window_act, window_ce, window_ce_rest, tokens, context_idx, end_pos FROM scan_windows "
                                   "WHERE scan_id = ? AND objective_key = ? ORDER BY rank", [scan_id, key]) if has_windows else []
            if kind == "objective":
                return store.fetch("SELECT window_act, window_ce, window_ce_rest FROM scan_objective_examples WHERE scan_id = ? "
                                   "AND objective_key = ? AND len(window_ids) = ?", [scan_id, key, n])
            return store.fetch("SELECT window_act, window_ce, window_ce_rest FROM scan_examples WHERE scan_id = ? AND latent = ? "
                               "AND kind = 'top' AND len(window_ids) = ? AND window_ce IS NOT NULL", [scan_id, target.latents[0], n])

        tops = store.fetch("SELECT tokens, max_pos FROM scan_examples WHERE scan_id = ? AND kind = 'top' AND list_contains(?, latent)",
                           [scan_id, list(target.latents)])
        out.append(target_inputs(
            target, key, scan_id=scan_id, window_len=n, scanned=scan["latents"],
            dreams=[d for d in dreams if d["target_id"] == t["target_id"]], attributions=[a for a in attrs if a["target_id"] == t["target_id"]],
            baseline=base.get(key), latent_rows=lat_rows, dataset=dataset, top_tokens=tops))
    return scan, out


def write_compare(store: Store, run_id: str, scan_id: str, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Replace the run's ``comparisons`` and ``compare_summary`` rows in one transaction (idempotent)."""
    with store.transaction():
        store.replace("comparisons", {"run_id": run_id}, [{"run_id": run_id, "scan_id": scan_id, **r} for r in rows])
        store.replace("compare_summary", {"run_id": run_id}, [{"run_id": run_id, **summary}])


def run_compare(cfg: ReverieConfig, store: Store, run_id: str, scan_id: str) -> list[dict[str, Any]]:
    """Compare a run's dreams with a scan's dataset examples and store the results.

    Reads with :func:`load_inputs`, compares with :func:`stages.compare.result.compare_inputs` (the
    library's call), writes with :func:`write_compare`.

    Returns:
        The per-target ``comparisons`` rows (dicts, ``metrics_json`` as text): single latents first, by latent id.
    Raises:
        ReverieError: unknown run or scan, or an unfinished scan.
    """
    scan, inputs = load_inputs(cfg, store, run_id, scan_id)
    c = compare_inputs(inputs, scan, cfg.compare, scan_id)
    write_compare(store, run_id, scan_id, c.rows, c.summary)
    return [{"run_id": run_id, "scan_id": scan_id, **r} for r in c.rows]
