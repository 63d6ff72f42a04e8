"""Executors: where dream units run. The driver alone writes DuckDB; executors only compute.

* :class:`LocalExecutor` — in-process, on the configured device, one unit after another.
* :class:`RayExecutor` — each dream unit is a Ray task on a pool of actors; every actor loads
  the model and SAE once (not per task) and returns plain results to the driver. Works on an
  existing cluster (``run.ray_address``) or starts a local one.

Both yield ``(target, results_or_error)`` as units finish, so the driver can commit each unit
the moment it is done (a kill loses at most the units in flight).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from pipeline.config import ReverieConfig
from sae_targets.selection import Target

log = logging.getLogger(__name__)

UnitResult = tuple[Target, Any]  # (target, list[DreamResult] or the Exception it raised)


def dream_unit(cfg: ReverieConfig, subject: Any, target: Target) -> list[Any]:
    """Compute one dream unit: every configured seed of one target (no DB access).

    Returns:
        One ``DreamResult`` per seed in ``cfg.dream.seeds``.
    """
    from stages.dream import dream_target

    return [dream_target(cfg, subject, target, seed) for seed in cfg.dream.seeds]


class LocalExecutor:
    """Runs dream units in this process with an already-loaded subject."""

    name = "local"

    def __init__(self, cfg: ReverieConfig, subject: Any):
        self.cfg = cfg
        self.subject = subject

    def map_dreams(self, targets: list[Target]) -> Iterator[UnitResult]:
        """Yield ``(target, [DreamResult, ...])`` or ``(target, exception)`` per target, in order."""
        for t in targets:
            try:
                yield t, dream_unit(self.cfg, self.subject, t)
            except Exception as e:  # noqa: BLE001 - one failing unit must not stop the others
                log.exception("dream unit %s failed", t.target_id)
                yield t, e

    def close(self) -> None:
        """Nothing to release."""


class _DreamWorker:
    """A Ray actor body: loads the subject once, then computes dream units."""

    def __init__(self, cfg_json: dict):
        import os
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from pipeline.config import ReverieConfig
        from sae_targets.loading import load_subject

        self.cfg = ReverieConfig.model_validate(cfg_json)
        from pipeline.runtime import apply_torch_threads

        apply_torch_threads(self.cfg.run)
        self.subject = load_subject(self.cfg.model, self.cfg.sae)

    def run(self, latents: list[int], combine: str | None, log10_density: list) -> list[Any]:
        t = Target(latents=list(latents), combine=combine, log10_density=list(log10_density))
        return dream_unit(self.cfg, self.subject, t)


class RayExecutor:
    """Runs dream units as Ray tasks on ``run.ray_num_workers`` actors.

    Raises:
        ReverieError: Ray is not installed (``pip install -e ".[ray]"``) or the cluster is unreachable.
    """

    name = "ray"

    def __init__(self, cfg: ReverieConfig):
        from pipeline.errors import ReverieError

        try:
            import ray
        except ImportError:
            raise ReverieError('run.executor = "ray" needs Ray: pip install -e ".[ray]"') from None
        self.ray = ray
        self.cfg = cfg
        rc = cfg.run
        self._started = False
        if not ray.is_initialized():
            try:
                if rc.ray_address:
                    ray.init(address=rc.ray_address, log_to_driver=False)
                else:
                    ray.init(num_cpus=max(rc.ray_num_workers * rc.ray_num_cpus_per_task, 1), include_dashboard=False,
                             log_to_driver=False, configure_logging=False)
                    self._started = True
            except Exception as e:  # noqa: BLE001
                raise ReverieError(f"cannot start or reach the Ray cluster ({rc.ray_address or 'local'}): {e}") from None
        actor_cls = ray.remote(num_cpus=rc.ray_num_cpus_per_task, num_gpus=rc.ray_num_gpus_per_task)(_DreamWorker)
        cfg_json = cfg.to_toml_dict()
        self.actors = [actor_cls.remote(cfg_json) for _ in range(rc.ray_num_workers)]

    def map_dreams(self, targets: list[Target]) -> Iterator[UnitResult]:
        """Submit every unit, round-robin over the actors; yield results as they complete."""
        ray = self.ray
        pending = {}
        for i, t in enumerate(targets):
            actor = self.actors[i % len(self.actors)]
            ref = actor.run.remote(t.latents, t.combine, t.log10_density)
            pending[ref] = t
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            t = pending.pop(ref)
            try:
                yield t, ray.get(ref)
            except Exception as e:  # noqa: BLE001
                log.error("dream unit %s failed on Ray: %s", t.target_id, e)
                yield t, e

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if self._started:
            self.ray.shutdown()


def make_executor(cfg: ReverieConfig, subject: Any):
    """The executor named by ``run.executor``."""
    if cfg.run.executor == "ray":
        return RayExecutor(cfg)
    return LocalExecutor(cfg, subject)
