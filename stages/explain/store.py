"""The explain stage's rows in the store: writing a run's results (:func:`write_explain`), its
earlier spend (:func:`prior_spend`) and the per-explanation score table the CLI prints."""

from __future__ import annotations

from typing import Any

from reverie.pipeline.store import Store, now
from reverie.stages.explain.results import ExplainResult


def write_explain(store: Store, result: ExplainResult) -> None:
    """Store a run's explanations, scores and failures (replacing the run's earlier rows) and
    append its calls to ``llm_calls``, in one transaction."""
    run_id, ts = result.run_id, now()
    with store.transaction():
        store.replace("explain_scores", {"run_id": run_id}, [
            {"run_id": run_id, "target_id": s.target_id, "explanation_id": s.explanation_id, "scored_explanation_id": s.scored_explanation_id,
             "holdout_set": s.holdout_set, "baseline": s.baseline, "metric": m, "value": float(v),
             "n": s.metrics.n, "n_pos": s.metrics.n_pos, "n_neg": s.metrics.n_neg, "scorer": s.scorer,
             "ci_low": s.intervals.get(m, (None,))[0], "ci_high": s.intervals.get(m, (None, None))[1],
             "ci_method": s.intervals.get(m, (None, None, None))[2], "n_pos_wanted": s.wanted[0], "n_neg_wanted": s.wanted[1],
             "n_hard_neg": s.n_hard_neg, "n_requests": s.n_requests}
            for s in result.scores for m, v in s.metrics.as_dict().items()
        ])
        store.replace("explanations", {"run_id": run_id}, [
            {"explanation_id": e.explanation_id, "run_id": run_id, "target_id": e.target_id, "source": e.source, "model": result.model,
             "text": e.text, "raw_text": e.raw_text, "prompt_hash": e.prompt_hash, "n_dataset": e.n_dataset, "n_dreams": e.n_dreams,
             "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "created_at": ts}
            for e in result.explanations
        ])
        store.replace("explain_failures", {"run_id": run_id}, [
            {"run_id": run_id, "target_id": f.target_id, "what": f.what, "why": f.why, "created_at": ts} for f in result.failures
        ])
        store.insert("llm_calls", [
            {"run_id": run_id, "target_id": c.target_id, "purpose": c.purpose, "key": c.key, "model": c.model, "cached": c.cached,
             "attempts": c.attempts, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
             "cost_usd": c.cost_usd, "latency_s": c.latency_s, "created_at": c.created_at}
            for c in result.calls
        ])


def prior_spend(store: Store, run_id: str) -> tuple[int, float]:
    """Tokens and USD of a run's earlier uncached LLM calls (so a budget cap spans reruns)."""
    row = store.fetch_one("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens, coalesce(sum(cost_usd), 0) AS usd "
                          "FROM llm_calls WHERE run_id = ? AND NOT cached", [run_id])
    return int(row["tokens"]), float(row["usd"])


def score_table(store: Store, run_id: str) -> list[dict[str, Any]]:
    """One row per explanation of a run: target, source, text, and balanced accuracy on each
    held-out set for the explanation and for its baseline (None where not scored)."""
    return store.fetch(
        """
        SELECT e.target_id, e.source, e.text,
               max(CASE WHEN s.holdout_set = 'dataset' AND NOT s.baseline THEN s.value END) AS dataset_ba,
               max(CASE WHEN s.holdout_set = 'dataset' AND s.baseline THEN s.value END) AS dataset_ba_baseline,
               max(CASE WHEN s.holdout_set = 'dreams' AND NOT s.baseline THEN s.value END) AS dreams_ba,
               max(CASE WHEN s.holdout_set = 'dreams' AND s.baseline THEN s.value END) AS dreams_ba_baseline
        FROM explanations e LEFT JOIN explain_scores s
             ON s.explanation_id = e.explanation_id AND s.metric = 'balanced_accuracy'
        WHERE e.run_id = ?
        GROUP BY e.target_id, e.source, e.text
        ORDER BY e.target_id, CASE e.source WHEN 'dataset' THEN 0 WHEN 'dreams' THEN 1 ELSE 2 END
        """,
        [run_id],
    )
