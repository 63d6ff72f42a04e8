"""Orchestration: runs, their targets, and (issue 7) the nightly batch over every stage."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from pipeline.config import ReverieConfig
from pipeline.store import Store
from sae_targets.loading import Subject
from sae_targets.selection import Target


def new_run_id(kind: str) -> str:
    """'<kind>-YYYYmmdd-HHMMSS-xxxx' (UTC time + 4 random hex digits, so two runs never collide)."""
    return f"{kind}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def target_rows(run_id: str, subject: Subject, targets: list[Target], density_source: str) -> list[dict]:
    """Rows of the ``targets`` table for a run."""
    return [
        {
            "run_id": run_id, "target_id": t.target_id, "model_key": subject.model_key, "sae_key": subject.sae_key,
            "hook_name": subject.hook_name, "latents": list(t.latents), "combine": t.combine,
            "log10_density": [float(d) if d is not None else None for d in t.log10_density], "density_source": density_source,
        }
        for t in targets
    ]


def record_targets(cfg: ReverieConfig, subject: Subject, targets: list[Target], density_source: str,
                   run_id: str | None = None, kind: str = "targets") -> str:
    """Start (or resume) a run and store its targets, replacing any earlier rows of that run.

    Returns:
        The run id.
    """
    run_id = run_id or new_run_id(kind)
    with Store(cfg.project.path) as store:
        store.start_run(run_id, kind, json.dumps(cfg.to_toml_dict(), sort_keys=True), cfg.fingerprint())
        store.replace("targets", {"run_id": run_id}, target_rows(run_id, subject, targets, density_source))
        if kind == "targets":
            store.finish_run(run_id, "done", summary={"n_targets": len(targets)})
    return run_id
