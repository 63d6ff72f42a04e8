"""Detection-scoring metrics: balanced accuracy, F1, precision and recall.

Detection scoring (EleutherAI delphi; Paulo et al. 2024, "Automatically Interpreting Millions of
Features in LLMs", §3): a scorer LLM sees only an explanation and labels held-out examples as
firing or not; the labels are compared with the truth. Balanced accuracy is the mean of the true
positive and true negative rates, so 0.5 is chance whatever the class balance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DetectionMetrics:
    """Scores of one explanation on one held-out set (all in [0, 1]); counts of examples."""

    balanced_accuracy: float
    f1: float
    precision: float
    recall: float
    n: int
    n_pos: int
    n_neg: int

    def as_dict(self) -> dict[str, float]:
        """``{metric name: value}`` for the metrics stored in ``explain_scores``."""
        return {"balanced_accuracy": self.balanced_accuracy, "f1": self.f1, "precision": self.precision, "recall": self.recall}


def detection_metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> DetectionMetrics:
    """Balanced accuracy, F1, precision and recall of binary predictions.

    Args:
        truth: whether each held-out example really fires (length n).
        predicted: the scorer's label for each example (length n).
    Returns:
        :class:`DetectionMetrics`; precision is 0 when nothing is predicted positive.
    Raises:
        ValueError: lengths differ, or one class is absent (balanced accuracy is undefined).
    """
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} truths but {len(predicted)} predictions")
    tp = sum(1 for t, p in zip(truth, predicted) if t and p)
    fn = sum(1 for t, p in zip(truth, predicted) if t and not p)
    tn = sum(1 for t, p in zip(truth, predicted) if not t and not p)
    fp = sum(1 for t, p in zip(truth, predicted) if not t and p)
    n_pos, n_neg = tp + fn, tn + fp
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"balanced accuracy needs both classes; got {n_pos} firing and {n_neg} non-firing examples")
    recall = tp / n_pos
    specificity = tn / n_neg
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return DetectionMetrics((recall + specificity) / 2, f1, precision, recall, n_pos + n_neg, n_pos, n_neg)
