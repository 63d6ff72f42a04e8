"""Active compute allocation inside a nightly's wall budget (``run.budget_s``; issue 15 §3).

After the first pass (the configured seeds of every target) and its comparison, the time left
goes to extra EPO seeds, one target at a time, most in need first:

1. targets whose best dream *lost* to the dataset (``comparisons.dominates`` is false),
2. targets whose frontier was *still improving* in the last 20% of its iterations (best
   activation rose by more than ``run.improving_min`` relative to its value at 80%), largest
   gain first;

and none for converged targets. EPO's seeds differ a lot (the paper's 60 seeds on one neuron
spanned a max activation of 2.4 to 10.2), so an extra seed is the natural unit. Every planned
unit is recorded in ``extra_seeds`` with its reason and whether it ran, and the page reports the
spread of the best activation over a target's seeds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reverie.pipeline.store import Store

if TYPE_CHECKING:
    from reverie.pipeline.config import ReverieConfig
    from reverie.sae_targets.loading import Subject
    from reverie.sae_targets.selection import Target

log = logging.getLogger("reverie.nightly")


@dataclass
class Extra:
    """One planned extra seed: the target, the seed, why, and its priority (higher first)."""

    target_id: str
    seed: int
    reason: str
    priority: float


def late_gain(store: Store, run_id: str, target_id: str) -> float | None:
    """Relative rise of the best activation over the last 20% of a target's EPO iterations (the
    largest over its seeds), from the frontier snapshots in ``dream_history``; None without them."""
    rows = store.fetch(
        "SELECT h.dream_id, h.iteration, MAX(h.activation) AS best, MAX(r.n_iterations) AS n FROM dream_history h "
        "JOIN dream_runs r ON r.dream_id = h.dream_id WHERE r.run_id = ? AND r.target_id = ? GROUP BY h.dream_id, h.iteration "
        "ORDER BY h.dream_id, h.iteration", [run_id, target_id])
    by_dream: dict[str, list[tuple[int, float, int]]] = {}
    for r in rows:
        by_dream.setdefault(r["dream_id"], []).append((int(r["iteration"]), float(r["best"]), int(r["n"])))
    gains = []
    for snaps in by_dream.values():
        n = snaps[-1][2]
        early = [b for it, b, _ in snaps if it <= 0.8 * n]
        if not early or snaps[-1][0] <= 0.8 * n:
            continue
        at80, final = early[-1], snaps[-1][1]
        gains.append((final - at80) / max(abs(at80), 1e-9))
    return max(gains) if gains else None


def plan_extra_seeds(store: Store, run_id: str, target_ids: list[str], improving_min: float = 0.01,
                     max_extra: int = 2) -> tuple[list[Extra], list[tuple[str, str]]]:
    """Extra seeds for the run's targets, most in need first.

    Returns:
        ``(plan, skipped)``: the extra units in priority order (up to ``max_extra`` per target,
        seeds after the target's highest), and ``(target_id, why)`` of the targets left alone.
    """
    plan: list[Extra] = []
    skipped: list[tuple[str, str]] = []
    for tid in target_ids:
        seeds = [int(r["seed"]) for r in store.fetch("SELECT seed FROM dream_runs WHERE run_id = ? AND target_id = ?", [run_id, tid])]
        if not seeds:
            skipped.append((tid, "no dreams in this run"))
            continue
        comp = store.fetch_one("SELECT dominates FROM comparisons WHERE run_id = ? AND target_id = ?", [run_id, tid])
        lost = comp is not None and comp["dominates"] is False
        gain = late_gain(store, run_id, tid)
        if lost:
            reason, prio = "its best dream lost to the dataset's best window", 2.0 + (gain or 0.0)
        elif gain is not None and gain > improving_min:
            reason, prio = f"its frontier still rose {gain:+.1%} in the last 20% of iterations", 1.0 + gain
        else:
            skipped.append((tid, "converged" + (f" ({gain:+.1%} in the last 20% of iterations)" if gain is not None else "")))
            continue
        top = max(seeds)
        plan += [Extra(tid, top + k, reason, prio - 0.001 * k) for k in range(1, max_extra + 1)]
    plan.sort(key=lambda e: -e.priority)
    return plan, skipped


def record(store: Store, run_id: str, extra: Extra | None, target_id: str, status: str, reason: str, wall_s: float | None = None) -> None:
    """One ``extra_seeds`` row: 'done' (ran), 'budget' (planned, no time left), 'skipped' (converged)."""
    from reverie.pipeline.store import now

    seed = extra.seed if extra else None
    store.replace("extra_seeds", {"run_id": run_id, "target_id": target_id, "seed": seed} if seed is not None else
                  {"run_id": run_id, "target_id": target_id, "status": status}, [{
                      "run_id": run_id, "target_id": target_id, "seed": seed, "status": status, "reason": reason,
                      "priority": extra.priority if extra else None, "wall_s": wall_s, "created_at": now()}])


def seed_spread(store: Store, run_id: str, target_id: str) -> dict[str, Any] | None:
    """Best activation per seed of a target in a run: ``{"seeds": n, "min": …, "max": …}`` (None without dreams)."""
    rows = store.fetch("SELECT r.seed, MAX(p.activation) AS best FROM dream_runs r JOIN dream_prompts p ON p.dream_id = r.dream_id "
                       "WHERE r.run_id = ? AND r.target_id = ? GROUP BY r.seed", [run_id, target_id])
    if not rows:
        return None
    vals = [float(r["best"]) for r in rows]
    return {"seeds": len(vals), "min": min(vals), "max": max(vals)}


def dataset_max(store: Store, scan_id: str | None) -> dict[int, float]:
    """latent → its best matched-length dataset window fed alone (else its in-context max) in the scan."""
    if not scan_id:
        return {}
    rows = store.fetch("SELECT latent, max_act, window_max FROM scan_latents WHERE scan_id = ?", [scan_id])
    return {int(r["latent"]): float(r["window_max"] if r.get("window_max") is not None else r["max_act"])
            for r in rows if (r.get("window_max") is not None or r.get("max_act") is not None)}


def run_extra_seeds(cfg: ReverieConfig, subject: Subject, store: Store, run_id: str, targets: list[Target], scan_id: str,
                    t0: float) -> int:
    """Spend what is left of ``run.budget_s`` on extra EPO seeds, most in need first
    (:func:`plan_extra_seeds`); a unit starts only if the time used
    plus the longest dream unit so far fits the budget, so the run ends within the budget plus
    one unit. Every planned unit is recorded in ``extra_seeds`` with its reason. Runs once per
    run id (a resume does not plan again).

    Returns:
        How many extra seeds ran.
    """
    from reverie.pipeline.executors import dream_unit
    from reverie.pipeline.signals import check_interrupt
    from reverie.stages.dream import write_dream

    if store.fetch_one("SELECT 1 AS x FROM extra_seeds WHERE run_id = ? LIMIT 1", [run_id]):
        return 0
    budget = float(cfg.run.budget_s)
    plan, skipped = plan_extra_seeds(store, run_id, [t.target_id for t in targets], cfg.run.improving_min, cfg.run.max_extra_seeds)
    with store.transaction():
        for tid, why in skipped:
            record(store, run_id, None, tid, "skipped", why)
    walls = [float(r["wall_s"] or 0.0) for r in store.fetch("SELECT wall_s FROM units WHERE run_id = ? AND stage = 'dream' AND status = 'done'", [run_id])]
    unit_s = max(walls) if walls else 0.0
    by_id = {t.target_id: t for t in targets}
    dmax = dataset_max(store, scan_id)
    ran = 0
    for e in plan:
        check_interrupt()
        used = time.time() - t0
        if used + unit_s > budget:
            record(store, run_id, e, e.target_id, "budget", f"{e.reason}; no time left ({used:.0f} s of {budget:.0f} s used)")
            continue
        ecfg = cfg.model_copy(update={"dream": cfg.dream.model_copy(update={"seeds": [e.seed]})})
        t1 = time.perf_counter()
        res = dream_unit(ecfg, subject, [by_id[e.target_id]], dmax)[0]
        wall = time.perf_counter() - t1
        if isinstance(res, Exception):
            record(store, run_id, e, e.target_id, "failed", f"{e.reason}; {type(res).__name__}: {res}", wall)
            continue
        with store.transaction():
            for r in res:
                write_dream(store, run_id, by_id[e.target_id], r)
            record(store, run_id, e, e.target_id, "done", e.reason, wall)
        log.info("extra seed %d for %s (%s): %.1f s", e.seed, e.target_id, e.reason, wall)
        unit_s = max(unit_s, wall)
        ran += 1
    return ran

