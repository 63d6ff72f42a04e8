"""The dream stage: Evolutionary Prompt Optimization (Thompson et al. 2024) on SAE-latent objectives.

Entry points: :func:`dream_targets` / :func:`dream_target` (pure compute, batched over targets), :func:`merge_results`, :func:`write_dream`
(DB), :func:`run_dream_stage`; the engine :func:`run_epo`; :func:`pareto_mask`;
:func:`token_attribution`.
"""

from reverie.stages.dream.attribution import token_attribution
from reverie.stages.dream.epo import DreamJob, IterationStats, run_epo, run_epo_batch
from reverie.stages.pareto import pareto_mask
from reverie.stages.dream.result import DreamPrompt, DreamResult, FrontierSnapshot, PositionAttribution, Replacement, RestartEvent
from reverie.stages.dream.stage import (
    dream_id_for, dream_target, dream_targets, format_frontier, merge_results, objective_scales, run_dream_stage, write_dream,
)

__all__ = [
    "DreamJob", "DreamPrompt", "DreamResult", "FrontierSnapshot", "IterationStats", "PositionAttribution", "Replacement", "RestartEvent",
    "dream_id_for", "dream_target", "dream_targets", "objective_scales", "run_epo_batch", "format_frontier", "merge_results", "pareto_mask", "run_dream_stage", "run_epo",
    "token_attribution", "write_dream",
]
