"""Cross-night reuse (issue 15): a target already dreamed under the same fingerprint is not dreamed again.

The fingerprint of a target's dreams (:func:`dream_fingerprint`) covers what decides them: the
model and SAE (their keys, content hashes and config sections), the hook, the target (latents and
combination), the objective settings of ``[targets]`` and every EPO setting of ``[dream]`` (seeds
included). A nightly copies the dream rows of the latest earlier run with the same fingerprint
(``dream_runs``, ``dream_prompts``, ``dream_history``, ``dream_attributions``; ``reused_from``
names the source) instead of running EPO, unless ``run.reuse_dreams`` is false. A run whose bulky
rows ``reverie gc`` dropped is never a source.

The random latent draw prefers latents of the same SAE that no earlier nightly explained
(:func:`explained_latents`; ``targets.allow_repeats`` turns that off).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.hashing import content_key
from reverie.pipeline.store import Store

if TYPE_CHECKING:
    from reverie.sae_targets.loading import Subject
    from reverie.sae_targets.selection import Target

log = logging.getLogger("reverie.nightly")

#: [targets] fields that change the objective (the others choose which latents)
OBJECTIVE_FIELDS = ("combine", "p", "offset", "quantity", "reduce")
#: tables holding a dream's rows, keyed by dream_id
DREAM_TABLES = ("dream_runs", "dream_prompts", "dream_history", "dream_attributions")


def dream_fingerprint(cfg: ReverieConfig, subject: "Subject", target: "Target") -> str:
    """sha256 (16 hex characters) of everything that decides a target's dreams.

    Args:
        cfg: the configuration ([model] — ``backend`` included unless 'hooked' —, [sae], [dream] and
            the objective fields of [targets]).
        subject: the loaded model + SAE (keys, hook, content hashes when known).
        target: the target (latents and combination).
    """
    data = cfg.to_toml_dict()
    model = {k: v for k, v in data["model"].items() if k != "device"}  # the device does not change what EPO optimizes
    if model.get("backend") == "hooked":   # the default backend keeps the fingerprints from before model.backend existed
        del model["backend"]
    blob = {
        "model": model, "sae": data["sae"], "dream": data["dream"],
        "objective": {k: data["targets"].get(k) for k in OBJECTIVE_FIELDS},
        "model_key": subject.model_key, "sae_key": subject.sae_key, "hook": subject.hook_name,
        "model_sha": getattr(subject, "model_sha", None), "sae_sha": getattr(subject, "sae_sha", None),
        "latents": list(target.latents), "combine": target.combine if target.is_combination else None,
    }
    return content_key(blob, default=str)


def explained_latents(store: Store, sae_key: str, run_id: str) -> set[int]:
    """Single latents of an SAE that an earlier nightly (any run but ``run_id``) dreamed or explained.

    Returns:
        Latent ids (may be empty).
    """
    rows = store.fetch(
        "SELECT DISTINCT t.latents[1] AS latent FROM targets t JOIN runs r USING (run_id) "
        "WHERE r.kind = 'nightly' AND t.run_id <> ? AND t.sae_key = ? AND len(t.latents) = 1 "
        "AND EXISTS (SELECT 1 FROM dream_runs d WHERE d.run_id = t.run_id AND d.target_id = t.target_id)", [run_id, sae_key])
    out = {int(r["latent"]) for r in rows}
    if "atlas_latents" in store.tables():
        out |= {int(r["latent"]) for r in store.fetch(
            "SELECT DISTINCT latents[1] AS latent FROM atlas_latents WHERE sae_key = ? AND run_id <> ? AND len(latents) = 1", [sae_key, run_id])}
    return out


def reusable_dreams(store: Store, run_id: str, fingerprint: str, seeds: list[int]) -> list[dict[str, Any]]:
    """The dream runs (one per configured seed) of the latest earlier run with this fingerprint,
    computed there (not themselves reused) and not dropped by ``reverie gc``; empty when no run has
    every seed.

    Returns:
        ``dream_runs`` rows ``{dream_id, run_id, target_id, seed}``, seed order.
    """
    rows = store.fetch(
        "SELECT d.dream_id, d.run_id, d.target_id, d.seed, r.started_at FROM dream_runs d JOIN runs r USING (run_id) "
        "WHERE d.fingerprint = ? AND d.run_id <> ? AND d.reused_from IS NULL AND r.gc_at IS NULL "
        "ORDER BY r.started_at DESC, d.run_id, d.seed", [fingerprint, run_id])
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    for run_rows in by_run.values():  # newest first
        have = {int(r["seed"]): r for r in run_rows}
        if all(int(s) in have for s in seeds):
            return [have[int(s)] for s in seeds]
    return []


def copy_dreams(store: Store, run_id: str, target_id: str, sources: list[dict[str, Any]], fingerprint: str) -> list[str]:
    """Copy dream rows of another run into ``run_id`` (dream ids re-prefixed with ``run_id``; the
    copy's ``reused_from`` names the source, its ``wall_s`` is 0). Replaces rows of an earlier copy.

    Returns:
        The new dream ids.
    Raises:
        StoreWriteError: the database cannot be written.
    """
    new_ids = []
    with store.transaction():
        for src in sources:
            new_id = f"{run_id}/{target_id}/seed{int(src['seed'])}"
            for table in DREAM_TABLES:
                store.execute(f'DELETE FROM "{table}" WHERE dream_id = ?', [new_id])
            store.execute("INSERT INTO dream_runs SELECT * REPLACE (? AS dream_id, ? AS run_id, ? AS target_id, 0.0 AS wall_s, "
                          "? AS reused_from, ? AS fingerprint) FROM dream_runs WHERE dream_id = ?",
                          [new_id, run_id, target_id, src["dream_id"], fingerprint, src["dream_id"]])
            for table in DREAM_TABLES[1:]:
                store.execute(f'INSERT INTO "{table}" SELECT * REPLACE (? AS dream_id) FROM "{table}" WHERE dream_id = ?',
                              [new_id, src["dream_id"]])
            new_ids.append(new_id)
    return new_ids


def mark_fingerprint(store: Store, run_id: str, target_id: str, fingerprint: str) -> None:
    """Record the fingerprint of a target's freshly computed dreams (``dream_runs.fingerprint``)."""
    store.execute("UPDATE dream_runs SET fingerprint = ? WHERE run_id = ? AND target_id = ? AND reused_from IS NULL",
                  [fingerprint, run_id, target_id])


def reuse_dreams(cfg: ReverieConfig, subject: "Subject", store: Store, ledger: Any, run_id: str,
                 todo: list["Target"]) -> list["Target"]:
    """The nightly's reuse step: every target of ``todo`` whose fingerprint an earlier run already
    dreamed gets those rows as its 'dream' unit (compute 0 s); the others are returned to be dreamed.

    Args:
        ledger: the run's :class:`pipeline.units.UnitLedger`.
    Returns:
        The targets still to dream (all of ``todo`` when ``run.reuse_dreams`` is false).
    """
    if not getattr(cfg.run, "reuse_dreams", True):
        return todo
    rest = []
    for t in todo:
        fp = dream_fingerprint(cfg, subject, t)
        sources = reusable_dreams(store, run_id, fp, list(cfg.dream.seeds))
        if not sources:
            rest.append(t)
            continue
        ok, _ = ledger.run(t.target_id, "dream", lambda t=t, fp=fp, sources=sources: copy_dreams(store, run_id, t.target_id, sources, fp),
                           wall_s=0.0)
        if ok:
            log.info("dream %s: reused %d seed(s) from %s (same fingerprint %s)", t.target_id, len(sources), sources[0]["run_id"], fp)
        else:
            rest.append(t)
    return rest
