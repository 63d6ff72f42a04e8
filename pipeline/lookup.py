"""Store read model for the defaults every command shares: which run is the latest, and which scan
serves a run (its dataset side). One rule each, used by the CLI, compare, explain and the report.

* :func:`latest_run` — the most recently started run (ties: the larger run id), optionally only
  among runs that have dream rows or target rows.
* :func:`scan_choice` / :func:`scan_for` — the scan the comparisons used (the run's; for one
  target, that target's own comparison row); else the newest ('updated_at') finished scan of the
  same model (``model_key``), SAE (``sae_key``) and hook point (``hook_name``) as the run's
  targets whose latents cover the wanted ones.

Reads only; a database without a table (an older schema, a stage that never ran) answers None.
"""

from __future__ import annotations

from typing import Iterable, Literal, NamedTuple

from reverie.pipeline.store import Store

#: how a scan was chosen (:attr:`ScanChoice.chosen_by`)
BY_COMPARISON = "comparison"
BY_COVERAGE = "latest covering scan"

_HAVING = {"dreams": "dream_runs", "targets": "targets"}


def latest_run(store: Store, having: Literal["dreams", "targets"] | None = None) -> str | None:
    """The most recently started run (``runs.started_at``; ties: the larger run id).

    Args:
        having: ``'dreams'`` — only runs with ``dream_runs`` rows; ``'targets'`` — only runs with
            ``targets`` rows; None — any run.
    Returns:
        The run id, or None when no run qualifies.
    Raises:
        ValueError: an unknown ``having``.
    """
    if having is not None and having not in _HAVING:
        raise ValueError(f"latest_run: having must be one of {sorted(_HAVING)} or None, not {having!r}")
    tables = set(store.tables())
    if "runs" not in tables:
        return None
    sql = "SELECT r.run_id FROM runs r"
    if having is not None:
        table = _HAVING[having]
        if table not in tables:
            return None
        sql += f" WHERE EXISTS (SELECT 1 FROM {table} x WHERE x.run_id = r.run_id)"
    row = store.fetch_one(sql + " ORDER BY r.started_at DESC, r.run_id DESC LIMIT 1")
    return row["run_id"] if row else None


class ScanChoice(NamedTuple):
    """The scan serving a run and why: ``chosen_by`` is :data:`BY_COMPARISON` or :data:`BY_COVERAGE`."""

    scan_id: str
    chosen_by: str


def scan_choice(store: Store, run_id: str, target_id: str | None = None,
                latents: Iterable[int] | None = None) -> ScanChoice | None:
    """The scan serving a run (or one of its targets), by the module's one rule.

    Args:
        run_id: the run.
        target_id: a target of the run: only its own comparison row counts, its model, SAE and
            hook point are matched and (without ``latents``) its latents must be covered. None:
            any comparison row of the run; the first target's identity; every target's latents.
        latents: the latent ids the scan must hold (default: see ``target_id``).
    Returns:
        The choice, or None when the run has no comparisons and no finished scan of its model, SAE
        and hook point covers the latents (or the run has no such target).
    """
    tables = set(store.tables())
    where, params = "run_id = ?", [run_id]
    if target_id is not None:
        where, params = where + " AND target_id = ?", params + [target_id]
    if "comparisons" in tables:
        row = store.fetch_one(f"SELECT scan_id FROM comparisons WHERE {where} ORDER BY target_id LIMIT 1", params)
        if row:
            return ScanChoice(row["scan_id"], BY_COMPARISON)
    if "targets" not in tables or "scans" not in tables:
        return None
    targets = store.fetch(f"SELECT model_key, sae_key, hook_name, latents FROM targets WHERE {where} ORDER BY target_id", params)
    if not targets:
        return None
    need = sorted({int(i) for i in latents}) if latents is not None else sorted({int(i) for t in targets for i in t["latents"]})
    t = targets[0]
    row = store.fetch_one(
        "SELECT scan_id FROM scans WHERE status = 'done' AND model_key = ? AND sae_key = ? AND hook_name = ? "
        "AND list_has_all(latents, ?::INTEGER[]) ORDER BY updated_at DESC, scan_id DESC LIMIT 1",
        [t["model_key"], t["sae_key"], t["hook_name"], need])
    return ScanChoice(row["scan_id"], BY_COVERAGE) if row else None


def scan_for(store: Store, run_id: str, target_id: str | None = None, latents: Iterable[int] | None = None) -> str | None:
    """The id of :func:`scan_choice`'s scan, or None."""
    choice = scan_choice(store, run_id, target_id, latents)
    return choice.scan_id if choice else None
