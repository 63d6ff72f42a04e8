"""Explain stage: LLM explanations of SAE latents from dataset examples, dreams, or both, scored
by detection against held-out examples (see :mod:`stages.explain.stage`).

Entry points: :func:`explain_available`, :func:`run_explain` (and the ``reverie explain`` command).
"""

from reverie.stages.explain.stage import ExplainSummary, explain_available, run_explain

__all__ = ["ExplainSummary", "explain_available", "run_explain"]
