"""The desk gate's validation metrics (numpy only): ROC-AUC, precision and recall at a threshold, and the
threshold with the most recall at a target precision.
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN without both classes."""
    labels = np.asarray(labels) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Precision and recall of ``score >= threshold`` (the service's rule); precision is NaN when
    nothing is predicted positive."""
    positive = np.asarray(labels) >= 0.5
    predicted = np.asarray(scores) >= threshold
    tp = int((positive & predicted).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else math.nan
    recall = tp / int(positive.sum()) if positive.any() else math.nan
    return precision, recall


def threshold_for_precision(labels: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, bool]:
    """The threshold with the most recall among those whose precision on (``labels``, ``scores``)
    reaches ``target`` (the highest such threshold among equal recall: no extra false accepts for
    nothing), and whether any reaches it. Placed halfway between the last score it accepts and the next
    lower one, so the decisions on these scores hold with a margin. When none reaches ``target``: the
    most precise one (the most recall among equals), and ``False``."""
    positive = np.asarray(labels) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    # Candidate cuts: after the last of each group of tied scores (accept every score >= s[k]).
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    precision = tp[ends] / (tp[ends] + fp[ends])
    meets = np.flatnonzero(precision >= target)
    met = meets.size > 0
    if met:
        best_tp = tp[ends[meets]].max()
        pick = ends[meets[np.flatnonzero(tp[ends[meets]] == best_tp)[0]]]
    else:
        most_precise = np.flatnonzero(precision == precision.max())
        pick = ends[most_precise[-1]]
    threshold = (s[pick] + s[pick + 1]) / 2 if pick + 1 < len(s) else s[pick]
    return float(threshold), met
