"""Speech emotion recognition metrics: UAR (the primary SER metric), accuracy, macro-F1, confusion, per-group UAR.

UAR (unweighted average recall) is the mean of per-class recalls, so chance is
1/C whatever the class balance. Classes absent from the evaluated labels are
left out of UAR and macro-F1 (and listed), rather than counted as zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def _uar_f1(cm: np.ndarray) -> tuple[float, float, list[float | None]]:
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan"), float("nan"), [None] * len(cm)
    tp = np.diag(cm).astype(float)
    recall = np.where(present, tp / np.maximum(support, 1), np.nan)
    predicted = cm.sum(axis=0)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    f1 = np.where(precision + np.nan_to_num(recall) > 0,
                  2 * precision * np.nan_to_num(recall) / np.maximum(precision + np.nan_to_num(recall), 1e-12), 0.0)
    return float(np.nanmean(recall)), float(f1[present].mean()), [None if np.isnan(r) else float(r) for r in recall]


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
                          groups: Sequence[str | None] | None = None) -> dict:
    """UAR, accuracy, macro-F1, per-class recall, confusion matrix and UAR per group (e.g. sex)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    uar, f1, recall = _uar_f1(cm)
    report = {
        "uar": uar,
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": f1,
        "recall": dict(zip(labels, recall, strict=True)),
        "confusion": cm.tolist(),
        "labels": list(labels),
        "num_utterances": int(len(y_true)),
    }
    if groups is not None:
        groups_arr = np.asarray([g if g is not None else "unknown" for g in groups])
        report["uar_by_group"] = {
            str(g): _uar_f1(confusion_matrix(y_true[groups_arr == g], y_pred[groups_arr == g], len(labels)))[0]
            for g in sorted(set(groups_arr.tolist()))
        }
    return report
