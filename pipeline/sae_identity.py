"""The SAE a run read, recorded in the database at run start (table ``run_saes``, migration 0012).

Reports read the SAE's Neuronpedia id from here: a registry SAE has no folder to re-read, and a
folder may change after the run.
"""

from __future__ import annotations

import json
from typing import Any

from reverie.pipeline.store import Store, now


def sae_identity_row(run_id: str, subject: Any) -> dict[str, Any]:
    """One ``run_saes`` row describing ``subject``'s SAE (a :class:`sae_targets.loading.Subject`).

    Returns:
        A dict with the table's columns: ``source`` is 'local' when ``sae_key`` is a folder (a
        path) and 'registry' ('release/sae_id') otherwise; ``sae_sha`` is the folder's content
        hash (:func:`pipeline.hashing.dir_sha256`) or ``'name:<key>'``.
    """
    from pathlib import Path

    local = Path(subject.sae_key).is_absolute()
    release, sae_id = (None, None) if local else (subject.extra.get("sae_release"), subject.extra.get("sae_id"))
    return {
        "run_id": run_id, "sae_key": subject.sae_key, "source": "local" if local else "registry",
        "release": release, "sae_id": sae_id, "sae_sha": subject.sae_sha, "architecture": subject.architecture,
        "d_in": subject.d_in, "d_sae": subject.d_sae, "hook_name": subject.hook_name,
        "prepend_bos": bool(subject.prepend_bos), "context_size": int(subject.context_size),
        "normalization": subject.normalization, "norm_scaling_factor": subject.norm_scaling_factor,
        "model_kwargs_json": json.dumps(subject.model_kwargs or {}, sort_keys=True, default=str),
        "neuronpedia_id": subject.neuronpedia_id or None, "model_key": subject.model_key, "model_sha": subject.model_sha,
        "recorded_at": now(),
    }


def record_sae(store: Store, run_id: str, subject: Any) -> None:
    """Store (replace) the run's ``run_saes`` row; called when a run starts or resumes, after the
    model and SAE loaded and fit.

    Raises:
        StoreWriteError: the database cannot be written.
    """
    store.replace("run_saes", {"run_id": run_id}, [sae_identity_row(run_id, subject)])


def run_sae(store: Store, run_id: str) -> dict[str, Any] | None:
    """The run's ``run_saes`` row as a dict, or None (a run recorded before migration 0012, or one
    that failed before its SAE loaded)."""
    return store.fetch_one("SELECT * FROM run_saes WHERE run_id = ?", [run_id])
