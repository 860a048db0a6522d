"""Empirical epsilon (Jagielski et al. 2020; Nasr et al. 2021): a lower bound from canary trials, beside the
accountant's upper bound.

One canary utterance (a noise burst, labelled with the corpus's first emotion, its features extracted like any
recording) joins one device. The federation runs ``trials`` times with and ``trials`` times without it. The
auditor sees what the accountant's epsilon protects against: the canary device's own update each round (local
DP-SGD, or no DP) or the round's sum (distributed DP, the aggregator's view). Its test statistic is white-box
(Nasr et al.): the sum over rounds of the observed update projected on the direction the canary's own clipped
gradient would move the model. The threshold is chosen on the first half of the trials and the test is scored on
the second half; Clopper-Pearson bounds on its TPR and FPR turn into a 95 % lower bound on epsilon
(:func:`experiments.audit.stats.epsilon_lower_bound`). If that bound ever exceeds the accountant's epsilon, the
accountant or the code is wrong: :func:`canary_audit` reports it as a violation and the tests fail on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from experiments.audit.federation import AuditFederation, Device, flatten, summed
from experiments.audit.stats import epsilon_lower_bound
from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.privacy.distributed import clipped_gradient_sum
from fl_ser.task import extract, extractor_from_config


def canary_features(fed: AuditFederation, seconds: float = 2.0, seed: int = 1234) -> torch.Tensor:
    """The canary's features: white noise at -20 dBFS, through the experiment's own extractor."""
    wave = np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1
    return extract(extractor_from_config(fed.cfg), [wave])


def canary_audit(fed: AuditFederation, devices: Sequence[Device], rounds: int, trials: int,
                 progress: Callable[[str], None] = print) -> dict:
    """``trials`` federations with and ``trials`` without the canary on ``devices[0]``; the lower bound and the
    accountant's epsilon for the canary over those ``rounds``."""
    feats = canary_features(fed)
    label = torch.tensor([0])
    host = devices[0]
    with_canary = Device(host.speaker, host.sex, torch.cat([host.x, feats]), torch.cat([host.y, label]))
    canary_x = fed.norm.module(host.x)(feats) if fed.norm.mode == "local" else fed.standardised(
        Device("canary", None, feats, label))
    clip = float(fed.cfg.privacy.dp_sgd.max_grad_norm) if fed.private else 1e6

    def score(devs: list[Device]) -> float:
        total = 0.0

        def observe(r, arrays, updates):
            nonlocal total
            seen = summed(updates) if fed.distributed else updates[0]
            g = flatten(clipped_gradient_sum(fed.classifier(arrays), canary_x, label, clip))
            total += float(np.dot(flatten(seen), -g) / (np.linalg.norm(g) + 1e-12))

        fed.run(devs, rounds, observe=observe)
        return total

    scores = {True: [], False: []}
    for t in range(trials):
        for present in (True, False):
            progress(f"canary: trial {t + 1}/{trials} ({'with' if present else 'without'} the canary)")
            scores[present].append(score([with_canary if present else host, *devices[1:]]))
    half = trials // 2
    threshold = _threshold(np.array(scores[True][:half]), np.array(scores[False][:half]))
    pos, neg = np.array(scores[True][half:]), np.array(scores[False][half:])
    tp, fp = int((pos > threshold).sum()), int((neg > threshold).sum())
    delta = float(fed.cfg.privacy.dp_sgd.delta)
    lower = epsilon_lower_bound(tp, len(pos), fp, len(neg), delta)
    upper = fed.epsilon(len(with_canary), rounds, len(devices))
    return {"rounds": rounds, "trials_per_arm": trials, "scored_per_arm": len(pos), "true_positives": tp,
            "false_positives": fp, "threshold": threshold, "delta": delta, "epsilon_lower_bound": round(lower, 4),
            "epsilon_accountant": None if upper is None else round(upper, 4),
            "violation": upper is not None and lower > upper,
            "max_measurable": round(epsilon_lower_bound(len(pos), len(pos), 0, len(neg), delta), 4),
            "unit": "utterance", "devices": len(devices), "canary": "white noise 2 s at -20 dBFS, label 0",
            "statistic": "sum over rounds of the observed update projected on the canary's clipped gradient"}


def _threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The calibration half's threshold with the largest smoothed log(TPR / FPR), TPR at least 5 %."""
    best, best_t = -np.inf, float(np.max(neg))
    for t in np.unique(np.r_[pos, neg]):
        tpr, fpr = ((pos > t).sum() + 0.5) / (len(pos) + 1), ((neg > t).sum() + 0.5) / (len(neg) + 1)
        value = np.log(tpr / fpr) if tpr >= 0.05 else -np.inf
        if value > best:
            best, best_t = value, float(t)
    return best_t
