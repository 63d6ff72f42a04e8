"""Executors: where dream units run. The driver alone writes DuckDB; executors only compute.

* :class:`LocalExecutor` — in-process, on the configured device, one unit after another.
* :class:`RayExecutor` — each dream unit is a Ray task on a pool of actors; every actor loads
  the model and SAE once (not per task) and returns plain results to the driver. Works on an
  existing cluster (``run.ray_address``) or starts a local one.

A unit of work is a *batch* of targets dreamed as one batched EPO search (``dream.batch_targets``
targets × seeds; default: what fits ``dream.batch_memory_mb``). Both executors yield
``(target, results_or_error)`` per target as its batch finishes, so the driver commits each
unit the moment it is done (a kill loses at most the batches in flight).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from reverie.pipeline.config import ReverieConfig
from reverie.sae_targets.selection import Target

log = logging.getLogger(__name__)

UnitResult = tuple[Target, Any]  # (target, list[DreamResult] or the Exception it raised)


def dream_unit(cfg: ReverieConfig, subject: Any, targets: list[Target], dataset_max: dict[int, float] | None = None) -> list[Any]:
    """Compute one dream unit: every configured seed of a batch of targets, as one batched EPO
    search (no DB access). If the batch raises, each target is dreamed alone so that one failing
    target (NaN weights, say) fails only its own unit; a target's results do not depend on its
    batch (same frontier alone or batched).

    Returns:
        Per target (in order), its list of ``DreamResult`` (one per seed in ``cfg.dream.seeds``)
        or the exception it raised.
    Raises:
        Interrupted: SIGINT/SIGTERM (never recorded as a unit failure).
    """
    from reverie.pipeline.signals import check_interrupt, is_interrupt
    from reverie.stages.dream import dream_targets

    try:
        return dream_targets(cfg, subject, targets, dataset_max=dataset_max, should_stop=check_interrupt)
    except Exception as e:  # noqa: BLE001 - isolate the failing target below
        if is_interrupt(e):
            raise
        if len(targets) == 1:
            log.exception("dream unit %s failed", targets[0].target_id)
            return [e]
        log.warning("dream batch %s failed (%s: %s); dreaming its targets one by one",
                    ", ".join(t.target_id for t in targets), type(e).__name__, e)
    return [r for t in targets for r in dream_unit(cfg, subject, [t], dataset_max)]


def target_batches(cfg: ReverieConfig, subject: Any, targets: list[Target], n_workers: int = 1) -> list[list[Target]]:
    """Split targets into dream units: at most ``dream.batch_targets`` (else what fits
    ``dream.batch_memory_mb``) jobs each, and at least one unit per worker when there are enough."""
    from reverie.stages.dream.stage import batch_capacity

    seeds = max(1, len(cfg.dream.seeds))
    cap = max(1, (cfg.dream.batch_targets or batch_capacity(subject, cfg.dream)) // seeds) if subject is not None else \
        max(1, (cfg.dream.batch_targets or len(targets)) // seeds)
    per = max(1, min(cap, -(-len(targets) // max(1, n_workers))))
    return [targets[i: i + per] for i in range(0, len(targets), per)]


class LocalExecutor:
    """Runs dream units (batches of targets) in this process with an already-loaded subject."""

    name = "local"

    def __init__(self, cfg: ReverieConfig, subject: Any, dataset_max: dict[int, float] | None = None):
        self.cfg = cfg
        self.subject = subject
        self.dataset_max = dataset_max

    def map_dreams(self, targets: list[Target]) -> Iterator[UnitResult]:
        """Yield ``(target, [DreamResult, ...])`` or ``(target, exception)`` per target, in order."""
        from reverie.pipeline.signals import is_interrupt

        for batch in target_batches(self.cfg, self.subject, targets):
            try:
                results = dream_unit(self.cfg, self.subject, batch, self.dataset_max)
            except Exception as e:  # noqa: BLE001 - one failing unit must not stop the others
                if is_interrupt(e):
                    raise
                log.exception("dream unit %s failed", ", ".join(t.target_id for t in batch))
                results = [e] * len(batch)
            yield from zip(batch, results)

    def close(self) -> None:
        """Nothing to release."""


class _DreamWorker:
    """A Ray actor body: loads the subject once, then computes dream units."""

    def __init__(self, cfg_json: dict):
        import os

        # no blanket warning filter: load_subject hides only its named, understood warnings
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from reverie.pipeline.config import ReverieConfig
        from reverie.sae_targets.loading import load_subject

        self.cfg = ReverieConfig.model_validate(cfg_json)
        from reverie.pipeline.runtime import apply_torch_threads

        apply_torch_threads(self.cfg.run)
        self.subject = load_subject(self.cfg.model, self.cfg.sae)

    def run(self, specs: list[tuple[list[int], str | None, list]], dataset_max: dict[int, float] | None = None) -> list[list[Any]]:
        """Dream a batch of targets given as ``(latents, combine, log10_density)`` tuples."""
        ts = [Target(latents=list(lat), combine=comb, log10_density=list(dens)) for lat, comb, dens in specs]
        return dream_unit(self.cfg, self.subject, ts, dataset_max)


class RayExecutor:
    """Runs dream units as Ray tasks on ``run.ray_num_workers`` actors.

    Raises:
        ReverieError: Ray is not installed (``pip install -e ".[ray]"``) or the cluster is unreachable.
    """

    name = "ray"

    def __init__(self, cfg: ReverieConfig, dataset_max: dict[int, float] | None = None):
        from reverie.pipeline.errors import ReverieError

        try:
            import ray
        except ImportError:
            raise ReverieError('run.executor = "ray" needs Ray: pip install -e ".[ray]"') from None
        self.ray = ray
        self.cfg = cfg
        self.dataset_max = dataset_max
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
        """Submit one batch of targets per unit, round-robin over the actors; yield each target's
        results as its batch completes."""
        ray = self.ray
        pending = {}
        for i, batch in enumerate(target_batches(self.cfg, None, targets, len(self.actors))):
            actor = self.actors[i % len(self.actors)]
            ref = actor.run.remote([(t.latents, t.combine, t.log10_density) for t in batch], self.dataset_max)
            pending[ref] = batch
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            batch = pending.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                log.error("dream unit %s failed on Ray: %s", ", ".join(t.target_id for t in batch), e)
                results = [e] * len(batch)
            yield from zip(batch, results)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if self._started:
            self.ray.shutdown()


def make_executor(cfg: ReverieConfig, subject: Any, dataset_max: dict[int, float] | None = None):
    """The executor named by ``run.executor``; ``dataset_max`` (latent → the scan's best window
    fed alone) serves ``dream.objective_scale = 'dataset_max'`` and picks the attributed dreams."""
    if cfg.run.executor == "ray":
        return RayExecutor(cfg, dataset_max)
    return LocalExecutor(cfg, subject, dataset_max)
