"""The audit's statistics: attack UAR with speaker-level confidence intervals, ROC figures, and the DP bounds an
attack is held to.

* :func:`uar_interval`: balanced accuracy (UAR) of an attack's predictions with a 95 % percentile bootstrap over
  *speakers* (clusters): several predictions about one speaker are not independent trials.
* :func:`roc` / :func:`tpr_at_fpr`: membership inference is judged at low false-positive rates (Carlini et al.
  2022), not by accuracy.
* :func:`epsilon_lower_bound`: Jagielski et al. 2020 / Nasr et al. 2021. Any (epsilon, delta)-DP mechanism makes
  every test satisfy ``TPR <= e^eps FPR + delta`` (and the same for the complements), so Clopper-Pearson bounds
  on TPR and FPR from independent trials give a lower bound on epsilon that holds with the stated confidence.
* :func:`membership_auc_bound`: the area under the largest ROC curve that inequality allows, the most AUC any
  membership attack on one record (or a pool of records, each protected alike) can reach;
* :func:`attribute_uar_bound`: the same inequality for a binary attribute (a speaker's sex): under
  (epsilon, delta)-DP *for the speaker* no attack's UAR exceeds ``(e^eps + delta) / (1 + e^eps)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import beta

#: Bootstrap resamples and the interval's confidence.
RESAMPLES = 2000
CONFIDENCE = 0.95


def uar(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted average recall over the classes present in ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def uar_interval(y_true: Sequence, y_pred: Sequence, clusters: Sequence, seed: int = 0) -> dict:
    """UAR with a 95 % bootstrap interval over ``clusters`` (the speaker each prediction is about)."""
    y_true, y_pred, clusters = np.asarray(y_true), np.asarray(y_pred), np.asarray(clusters)
    if len(np.unique(y_true)) < 2:
        return {"uar": None, "ci95": None, "n": int(len(y_true)), "speakers": int(len(np.unique(clusters))),
                "chance": 0.5, "note": "fewer than two classes among the attack's targets: no UAR"}
    names = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in names]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(RESAMPLES):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(names), len(names))])
        if len(np.unique(y_true[idx])) > 1:  # a resample of one class has no UAR
            draws.append(uar(y_true[idx], y_pred[idx]))
    lo, hi = (np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]) if draws else (np.nan, np.nan))
    return {"uar": round(uar(y_true, y_pred), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "n": int(len(y_true)), "speakers": int(len(names)), "chance": round(1 / len(np.unique(y_true)), 4)}


def roc(scores: Sequence[float], members: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold of ``scores`` (higher: more likely a member), from (0, 0) to (1, 1)."""
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], members[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one point per distinct score
    tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
    return np.r_[0.0, fp / max((~m).sum(), 1)], np.r_[0.0, tp / max(m.sum(), 1)]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR among thresholds whose FPR is at most ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided binomial interval."""
    a = (1 - confidence) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - a, successes + 1, trials - successes))
    return lo, hi


def epsilon_lower_bound(true_pos: int, positives: int, false_pos: int, negatives: int, delta: float,
                        confidence: float = CONFIDENCE) -> float:
    """A lower bound on epsilon, at ``confidence``, from one test's outcomes on independent trials with
    (``positives``) and without (``negatives``) the canary. Each bound is one side of the two-sided interval at
    ``confidence``, i.e. one-sided at ``(1 + confidence) / 2``: by the union bound both hold with ``confidence``."""
    tpr_lo = clopper_pearson(true_pos, positives, confidence)[0]
    fpr_hi = clopper_pearson(false_pos, negatives, confidence)[1]
    fnr_hi, tnr_lo = 1 - tpr_lo, 1 - fpr_hi
    bounds = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        bounds.append(math.log((tpr_lo - delta) / fpr_hi))
    if tnr_lo - delta > 0 and fnr_hi > 0:
        bounds.append(math.log((tnr_lo - delta) / fnr_hi))
    return max(bounds)


def attribute_uar_bound(epsilon: float, delta: float) -> float:
    """The highest UAR any attack on a binary attribute can reach against (epsilon, delta)-DP for the speaker."""
    if math.isinf(epsilon):
        return 1.0
    return min(1.0, (math.exp(epsilon) + delta) / (1 + math.exp(epsilon)))


def dp_roc_bound(epsilon: float, delta: float, fpr: np.ndarray | float) -> np.ndarray:
    """The highest TPR an (epsilon, delta)-DP mechanism lets any test reach at ``fpr``: both
    ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta`` (Kairouz et al. 2015)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if math.isinf(epsilon):
        return np.ones_like(fpr)
    e = math.exp(epsilon)
    return np.clip(np.minimum(e * fpr + delta, 1 - (1 - delta - fpr) / e), 0.0, 1.0)


def membership_auc_bound(epsilon: float | None, delta: float, points: int = 100_001) -> float:
    """The AUC of :func:`dp_roc_bound`'s curve (1.0 without DP). A pooled ROC over records obeys it too: at one
    threshold its TPR and FPR are means of the records' own, and the bound is linear in them."""
    if epsilon is None:
        return 1.0
    grid = np.linspace(0.0, 1.0, points)
    return auc(grid, dp_roc_bound(epsilon, delta, grid))
