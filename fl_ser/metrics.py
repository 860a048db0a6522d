"""Speech emotion recognition metrics: UAR (the primary SER metric), accuracy, macro-F1, confusion, per-group UAR.

UAR (unweighted average recall) is the mean of per-class recalls, so chance is
1/C whatever the class balance. Classes absent from the evaluated labels are
left out of UAR and macro-F1 (and listed), rather than counted as zero; the
same holds within a group, so a speaker who never expresses an emotion is
scored on the emotions they do express.

Fairness figures: UAR per group (e.g. per sex) and per speaker, and the worst
speaker (the lowest per-speaker UAR and who it is), since a mean over speakers
can hide one speaker the model fails.
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
                          groups: Sequence[str | None] | None = None,
                          speakers: Sequence[str] | None = None) -> dict:
    """UAR, accuracy, macro-F1, per-class recall, confusion matrix, UAR per group (``groups``: e.g. each
    utterance's sex) and, given each utterance's speaker, UAR per speaker and the worst speaker."""
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
        report["uar_by_group"] = uar_by(y_true, y_pred, len(labels), groups)
    if speakers is not None:
        report["uar_by_speaker"] = uar_by(y_true, y_pred, len(labels), speakers)
        report["worst_speaker"], report["worst_speaker_uar"] = worst_group(report["uar_by_speaker"])
    return report


def uar_by(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
           groups: Sequence[str | None]) -> dict[str, float]:
    """UAR of each group's utterances, by group name (sorted; a missing name is ``"unknown"``)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    names = [str(g) if g is not None else "unknown" for g in groups]
    if len(names) != len(y_true):
        raise ValueError(f"{len(names)} group names for {len(y_true)} utterances")
    order, index = np.unique(np.asarray(names, dtype=object), return_inverse=True)  # one pass, any number of groups
    cms = np.zeros((len(order), num_classes, num_classes), dtype=np.int64)
    np.add.at(cms, (index, y_true, y_pred), 1)
    return {str(g): _uar_f1(cm)[0] for g, cm in zip(order, cms, strict=True)}


def worst_group(uars: dict[str, float]) -> tuple[str | None, float]:
    """The group with the lowest UAR and that UAR (ties: the first name); ``(None, nan)`` when none has a UAR."""
    scored = [(u, g) for g, u in sorted(uars.items()) if u is not None and not np.isnan(u)]
    if not scored:
        return None, float("nan")
    uar, name = min(scored, key=lambda t: t[0])
    return name, float(uar)
