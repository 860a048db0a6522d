"""Membership inference on the released model: was this utterance in training?

The unit is the utterance (the unit of fl-ser's sample-level DP): every device trains on a random half of its
own utterances, and the other half, from the *same* speakers, are the non-members, so the attack must detect the
utterance, not the speaker. Two attacks, judged by AUC and by TPR at 0.1 % and 1 % FPR (Carlini et al. 2022):

* ``loss``: the release's confidence in the true label (Yeom et al. 2018);
* ``lira``: LiRA, fixed-variance and online (Carlini et al. 2022): shadow federations, each on its own random
  halves, give every utterance a distribution of the logit-scaled confidence ``log p / (1 - p)`` when it was in
  and when it was out; the score is their Gaussian likelihood ratio.

Written here rather than with adversarial-robustness-toolbox or privacy-meter: their shadow-model attacks train
shadow *centralised* estimators through their own wrappers, while the target here is a federation (the devices'
DP-SGD, clipping and the server's aggregation), which only :class:`~experiments.audit.federation.AuditFederation`
trains. The statistics are a few lines; the shadow training is ours either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from experiments.audit.federation import AuditFederation, Device
from experiments.audit.stats import auc, dp_roc_bound, membership_auc_bound, roc, tpr_at_fpr

FPRS = (0.001, 0.01)


def _true_label_logit(fed: AuditFederation, arrays, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` of every utterance under the model ``arrays`` (features as each device has them)."""
    model = fed.classifier(arrays)
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(model(x), dim=1) for x in xs]).double()
    y = torch.cat(ys)
    own = logp[torch.arange(len(y)), y]
    rest = torch.logsumexp(logp.masked_fill(torch.nn.functional.one_hot(y, logp.shape[1]).bool(), -np.inf), dim=1)
    return (own - rest).numpy()


def membership_audit(fed: AuditFederation, devices: Sequence[Device], rounds: int, shadows: int = 8, seed: int = 0,
                     progress: Callable[[str], None] = print) -> dict:
    """Train a target and ``shadows`` shadow federations on random halves; returns both attacks' figures and
    their ROC curves (for the plot)."""
    rng = np.random.default_rng(seed)
    xs = [fed.standardised(d) for d in devices]
    ys = [d.y for d in devices]
    sizes = [len(d) for d in devices]
    runs = []
    for s in range(shadows + 1):
        progress(f"membership inference: federation {s + 1}/{shadows + 1} ({'target' if s == 0 else 'shadow'})")
        inside = [rng.random(n) < 0.5 for n in sizes]
        halves = [d.subset(np.flatnonzero(m)) for d, m in zip(devices, inside, strict=True)]
        arrays = fed.run(halves, rounds)
        runs.append((np.concatenate(inside), _true_label_logit(fed, arrays, xs, ys)))
    member, target = runs[0]
    shadow_in = np.stack([m for m, _ in runs[1:]])
    shadow_phi = np.stack([p for _, p in runs[1:]])
    scores = {"loss": target, "lira": _lira(target, shadow_in, shadow_phi)}
    out = {"rounds": rounds, "shadows": shadows, "members": int(member.sum()), "non_members": int((~member).sum())}
    for name, score in scores.items():
        fpr, tpr = roc(score, member)
        out[name] = {"auc": round(auc(fpr, tpr), 4),
                     **{f"tpr_at_{f * 100:g}%_fpr": round(tpr_at_fpr(fpr, tpr, f), 4) for f in FPRS},
                     "roc": _thin(fpr, tpr)}
    out["chance"] = {"auc": 0.5, **{f"tpr_at_{f * 100:g}%_fpr": f for f in FPRS}}
    # the DP bound, for the device whose members are least protected (a device trains on about half its data)
    eps = [fed.epsilon(max(1, n // 2), rounds, len(devices)) for n in sizes]
    worst = None if None in eps else max(eps)
    delta = float(fed.cfg.privacy.dp_sgd.delta)
    out["dp_bound"] = {"epsilon_accountant": None if worst is None else round(worst, 4), "delta": delta,
                       "auc": round(membership_auc_bound(worst, delta), 4),
                       **{f"tpr_at_{f * 100:g}%_fpr": round(float(dp_roc_bound(worst, delta, f)), 6)
                          if worst is not None else 1.0 for f in FPRS}}
    return out


def _lira(target: np.ndarray, shadow_in: np.ndarray, shadow_phi: np.ndarray) -> np.ndarray:
    """Fixed-variance online LiRA: per-utterance means in and out, one variance each pooled over utterances."""
    n_in, n_out = shadow_in.sum(0), (~shadow_in).sum(0)
    mu_in = np.where(n_in > 0, (shadow_phi * shadow_in).sum(0) / np.maximum(n_in, 1), np.nan)
    mu_out = np.where(n_out > 0, (shadow_phi * ~shadow_in).sum(0) / np.maximum(n_out, 1), np.nan)
    var_in = np.nanmean(np.where(shadow_in, (shadow_phi - mu_in) ** 2, np.nan)) + 1e-12
    var_out = np.nanmean(np.where(~shadow_in, (shadow_phi - mu_out) ** 2, np.nan)) + 1e-12
    mu_in = np.where(np.isnan(mu_in), np.nanmean(mu_in), mu_in)  # an utterance never in (or out) of a shadow
    mu_out = np.where(np.isnan(mu_out), np.nanmean(mu_out), mu_out)
    return (-(target - mu_in) ** 2 / (2 * var_in) - 0.5 * np.log(var_in)
             + (target - mu_out) ** 2 / (2 * var_out) + 0.5 * np.log(var_out))


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int = 200) -> dict:
    """The ROC curve at ``points`` log-spaced FPRs (enough to plot on log axes; JSON stays small)."""
    grid = np.r_[0.0, np.logspace(-4, 0, points)]
    return {"fpr": [round(float(f), 6) for f in grid],
            "tpr": [round(tpr_at_fpr(fpr, tpr, float(f)), 6) for f in grid]}
