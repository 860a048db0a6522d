"""Attribute inference (Feng et al. 2021/2022): what the server's view of a federation says about a speaker's sex.

The attacker knows the training algorithm and holds *shadow* speech of known sex. For each global model it sees,
it trains shadow devices (random halves of shadow speakers' utterances) exactly as a device would, and fits a
logistic regression from the shadow updates' first layer (the layer that leaks most, per Feng et al.) to the
shadow speaker's sex. Shadow speakers never include the victim: for a single device's update they are every
other speaker of the corpus, training and held-out (leave-one-speaker-out: in-distribution speech, the strong end
of the threat model); for a cohort's sum, whose members are several training speakers at once, they are the
corpus's held-out speakers only, which no federation trains on (a disjoint shadow corpus, so the shadows' sex mix
does not depend on the cohort's).

Views, each reported as attack UAR with a 95 % bootstrap interval over speakers (chance 0.5):

* ``single_update``: one device's update, as an honest-but-curious server sees it under ``aggregation=plain``
  (no DP, DP-SGD, or a distributed-DP share), one prediction per update; ``all_rounds``: one prediction per
  device from all the rounds it was seen in (mean log-odds), since plain aggregation tells the server who sent
  what;
* ``crafted_update``: a malicious server sends a *trap* model (:func:`trap_model`) whose output layer confidently
  predicts one class, so that every utterance's gradient carries its features almost unchanged into the
  first layer, and reads the device's update;
* ``cohort_sum``: what SecAgg+ or CKKS reveals of an honest round, the sum over a cohort: predict the cohort's
  majority sex;
* ``difference``: the malicious server sends the trap model to the cohort with and without the victim (two
  rounds) and subtracts the two sums; SecAgg+ allows it, only DP noise defends;
* ``release``: property inference on the released model: the majority sex of the federation it was trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from experiments.audit.federation import Arrays, AuditFederation, Device, flatten, summed
from experiments.audit.stats import uar_interval

MALE = "m"
#: The trap model's output bias for class 0: softmax(8) over 7 classes puts 0.998 on it, so an utterance's
#: gradient at the output is e_0 - y (its features scaled by a constant) for every utterance not of class 0.
TRAP_BIAS = 8.0


def is_male(device: Device) -> int:
    return int(device.sex == MALE)


def first_layer(update: Arrays) -> np.ndarray:
    return np.asarray(update[0], dtype=np.float64).ravel()


def logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """P(class 1) for ``x_test`` from an L2-regularised logistic regression on standardised ``x_train``, each class
    weighted equally: leaving the victim's speaker out unbalances the classes against it, and an unweighted fit
    would then predict the victim's sex *wrong* whenever the features carry nothing (UAR near 0, not 0.5)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-12
    xt = torch.from_numpy((x_train - mean) / std).float()
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.float32))
    share = float(yt.mean())
    weight = torch.where(yt > 0.5, 0.5 / max(share, 1e-12), 0.5 / max(1 - share, 1e-12))
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.sigmoid(torch.from_numpy((x_test - mean) / std).float() @ w + b).numpy()


def trap_model(arrays: Arrays) -> Arrays:
    """The global model a malicious server sends to make updates leak: ``arrays`` with the output layer's bias
    (the last array, for every model of :mod:`fl_ser.models.classifiers`) raised by :data:`TRAP_BIAS` for class 0.
    Nothing on the device inspects the model it is sent; the device's own clipping and noise still apply."""
    out = [a.copy() for a in arrays]
    out[-1][0] += TRAP_BIAS
    return out


def shadow_devices(device: Device, count: int, rng: random.Random) -> list[Device]:
    """``count`` shadow devices from one shadow speaker: random halves of its utterances."""
    n = len(device)
    return [device.subset(sorted(rng.sample(range(n), max(2, n // 2))), f"{device.speaker}#{j}") for j in range(count)]


class _Round:
    """One global model: the victims' real updates and every shadow device's update from the same model (the
    training speakers' shadows, and the held-out speakers' in ``outside``)."""

    def __init__(self, fed: AuditFederation, arrays: Arrays, updates: list[Arrays], devices: Sequence[Device],
                 shadows: dict[str, list[Device]], outside: dict[str, list[Device]]):
        cohort = len(devices)
        self.arrays, self.updates = arrays, updates
        self.sex = {s: is_male(ds[0]) for s, ds in {**shadows, **outside}.items()}
        self.shadow = {s: [fed.contribution(arrays, d, cohort) for d in ds] for s, ds in shadows.items()}
        self.outside = {s: [fed.contribution(arrays, d, cohort) for d in ds] for s, ds in outside.items()}


def attribute_audit(fed: AuditFederation, devices: Sequence[Device], heldout: Sequence[Device], rounds: int = 3,
                    shadows_per_speaker: int = 6, cohort_size: int = 5, cohorts: int = 40,
                    release_federations: int = 24, release_rounds: int = 5, seed: int = 0,
                    progress: Callable[[str], None] = print) -> dict:
    """Every view against ``fed``'s training ``devices`` (one per speaker, known sex), with the ``heldout``
    speakers as the cohort view's disjoint shadows; returns JSON-able figures."""
    rng = random.Random(seed)
    shadows = {d.speaker: shadow_devices(d, shadows_per_speaker, rng) for d in devices}
    outside = {d.speaker: shadow_devices(d, shadows_per_speaker, rng) for d in heldout}
    seen: list[_Round] = []

    def observe(r, arrays, updates):
        progress(f"attribute inference: round {r}/{rounds}, {sum(map(len, shadows.values()))} shadow devices")
        seen.append(_Round(fed, arrays, updates, devices, shadows, outside))

    fed.run(devices, rounds, observe=observe)
    trap = trap_model(seen[0].arrays)
    trapped = _Round(fed, trap, [fed.contribution(trap, d, len(devices)) for d in devices], devices, shadows,
                     outside)
    per_update, per_device = _single_update(devices, seen)
    return {"single_update": per_update, "all_rounds": per_device,
            "crafted_update": _single_update(devices, [trapped])[0],
            "cohort_sum": _cohort_sum(devices, heldout, seen, cohort_size, cohorts, rng),
            "difference": _difference(fed, devices, trapped),
            "release": _release(fed, devices, release_federations, release_rounds, cohort_size, rng, progress),
            "settings": {"rounds_observed": rounds, "shadows_per_speaker": shadows_per_speaker,
                         "cohort_size": cohort_size, "cohorts": cohorts, "release_federations": release_federations,
                         "release_rounds": release_rounds, "feature": "first layer of the update",
                         "trap_bias": TRAP_BIAS,
                         "shadow_data": "single updates and differences: every speaker but the victim (the other "
                                        "training speakers and the held-out ones); cohort sums: the held-out "
                                        "speakers; release: the other half of the training speakers"}}


def _shadow_training(rnd: _Round, victim: str) -> tuple[np.ndarray, np.ndarray]:
    """The single-update attack's training set against ``victim``: every shadow update from the same model but
    the victim's own (the other training speakers' and the held-out speakers')."""
    pool = {**rnd.shadow, **rnd.outside}
    x = [first_layer(u) for s, us in pool.items() if s != victim for u in us]
    y = [rnd.sex[s] for s, us in pool.items() if s != victim for _ in us]
    return np.stack(x), np.asarray(y)


def _single_update(devices: Sequence[Device], seen: list[_Round]) -> tuple[dict, dict]:
    """(one prediction per update, one per device from the mean log-odds of all its updates)."""
    truth, pred, who = [], [], []
    log_odds: dict[str, list[float]] = {d.speaker: [] for d in devices}
    for rnd in seen:
        for d, update in zip(devices, rnd.updates, strict=True):
            x, y = _shadow_training(rnd, d.speaker)
            p = float(np.clip(logistic(x, y, first_layer(update)[None])[0], 1e-9, 1 - 1e-9))
            log_odds[d.speaker].append(np.log(p) - np.log1p(-p))
            pred.append(int(p > 0.5))
            truth.append(is_male(d))
            who.append(d.speaker)
    speakers = [d.speaker for d in devices]
    per_device = uar_interval([is_male(d) for d in devices], [int(np.mean(log_odds[s]) > 0) for s in speakers],
                              speakers)
    return uar_interval(truth, pred, who), per_device


def _difference(fed: AuditFederation, devices: Sequence[Device], rnd: _Round) -> dict:
    """Per victim: sum(cohort with it) - sum(cohort without it), the rest of the cohort training twice from the
    same (trap) model (fresh DP noise each time), classified by the single-update attack."""
    truth, pred, who = [], [], []
    for i, d in enumerate(devices):
        rest = [o for j, o in enumerate(devices) if j != i]
        again = [fed.contribution(rnd.arrays, o, len(devices)) for o in rest]
        diff = summed(rnd.updates)[0] - summed(again)[0]
        x, y = _shadow_training(rnd, d.speaker)
        pred.append(int(logistic(x, y, diff.ravel()[None])[0] > 0.5))
        truth.append(is_male(d))
        who.append(d.speaker)
    return uar_interval(truth, pred, who)


def _cohort_sum(devices: Sequence[Device], heldout: Sequence[Device], seen: list[_Round], size: int, cohorts: int,
                rng: random.Random) -> dict:
    """Random cohorts of ``size`` training devices (odd: no ties). The attacker's classifier, trained on the held-out
    speakers' shadow updates from the same model, is linear: applied to the sum over ``size`` it scores the
    cohort's mean update, and the cohort is called majority male when that mean scores male."""
    sex = {d.speaker: is_male(d) for d in [*devices, *heldout]}
    if len({sex[d.speaker] for d in heldout}) < 2:
        return {"uar": None, "ci95": None, "n": 0, "speakers": 0, "chance": 0.5,
                "note": "the held-out speakers are all of one sex: no shadow classifier for cohort sums"}
    truth, pred, who = [], [], []
    for c in range(cohorts):
        rnd = seen[c % len(seen)]
        members = rng.sample(range(len(devices)), size)
        x = [first_layer(u) for us in rnd.outside.values() for u in us]
        y = [sex[s] for s, us in rnd.outside.items() for _ in us]
        mean = first_layer(summed([rnd.updates[i] for i in members])) / size
        pred.append(int(logistic(np.stack(x), np.asarray(y), mean[None])[0] > 0.5))
        truth.append(int(sum(sex[devices[i].speaker] for i in members) * 2 > size))
        who.append(f"cohort{c}")
    return uar_interval(truth, pred, who)


def _release(fed: AuditFederation, devices: Sequence[Device], federations: int, rounds: int, size: int,
             rng: random.Random, progress: Callable[[str], None]) -> dict:
    """Property inference: federations of ``size`` shadow devices with random sex mixes; the attack trains on
    releases of federations from one half of the speakers and predicts the majority sex of the other half's."""
    males = [d for d in devices if is_male(d)]
    females = [d for d in devices if not is_male(d)]
    halves = [males[0::2] + females[0::2], males[1::2] + females[1::2]]  # each half holds both sexes
    models: list[list[tuple[np.ndarray, int]]] = [[], []]
    for h, half in enumerate(halves):
        for f in range(federations):
            progress(f"attribute inference: release {h * federations + f + 1}/{2 * federations}")
            members = [rng.choice(half) for _ in range(size)]
            subsets = [m.subset(sorted(rng.sample(range(len(m)), max(2, len(m) // 2)))) for m in members]
            arrays = fed.run(subsets, rounds)
            models[h].append((flatten(arrays), int(sum(map(is_male, members)) * 2 > size)))
    truth, pred, who = [], [], []
    for h in (0, 1):
        train, test = models[1 - h], models[h]
        if len({y for _, y in train}) < 2:
            continue
        p = logistic(np.stack([x for x, _ in train]), np.asarray([y for _, y in train]),
                     np.stack([x for x, _ in test]))
        pred += [int(v > 0.5) for v in p]
        truth += [y for _, y in test]
        who += [f"half{h}-{i}" for i in range(len(test))]
    return uar_interval(truth, pred, who)
