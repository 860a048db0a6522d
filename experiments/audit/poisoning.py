"""Malicious devices (issue 13, part 4): k of n devices poison the federation; which defences hold.

Attacks (the first ``k`` training speakers are malicious):

* ``label_flip``: the attacker trains honestly on its own data with every label ``y`` replaced by ``C - 1 - y``;
* ``scaled``: the attacker sends its honest update negated and boosted ``BOOST`` times (it skips device-side
  clipping: only honest devices enforce it);
* ``backdoor``: a quiet 4 kHz tone is added to the attacker's *waveforms* before feature extraction, those
  triggered utterances are relabelled to one target emotion and trained on together with its clean data.

Defences: ``none`` (FedAvg), ``clipping`` (the server clips every single update to the norm, then FedAvg),
``clipping_dp`` (the private experiment's own DP-SGD and clipping on the devices, plus the same server-side
clipping), and Flower's own robust strategies on plain aggregation: ``median`` (FedMedian), ``trimmed_mean``
(FedTrimmedAvg, beta 0.2), ``krum`` (multi-Krum keeping n - k) and ``bulyan``. A strategy whose assumptions
the federation does not meet (Krum: n >= 2k + 3, Bulyan: n >= 4k + 3) is reported as not applicable.

Metrics: held-out UAR on the clean test speakers and, for the backdoor, its success rate: the fraction of
triggered test utterances whose true label is not the target that the model predicts as the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.server.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

from experiments.audit.federation import AuditFederation, Device, corpus_devices, no_metrics
from experiments.audit.stats import uar
from fl_ser.data.corpus import corpus_from_config
from fl_ser.privacy.policy import clip_norm
from fl_ser.task import extract, extractor_from_config
from fl_ser.training import predict

#: The scaled attacker's boost of its negated update.
BOOST = 10.0
#: The backdoor trigger: a sine at this frequency, its amplitude this fraction of the utterance's RMS.
TRIGGER = {"kind": "tone", "frequency_hz": 4000.0, "relative_amplitude": 0.5, "sample_rate": 16000}
DEFENCES = ("none", "clipping", "clipping_dp", "median", "trimmed_mean", "krum", "bulyan")
ATTACKS = ("label_flip", "scaled", "backdoor")

SECAGG_NOTE = (
    "Under SecAgg+ (or CKKS) the server sees only the sum of the masked updates, never a single one, so every "
    "defence that inspects or ranks single updates is ruled out: FedMedian, FedTrimmedAvg, Krum, Bulyan and "
    "server-side norm bounding (an update's norm cannot be checked under masking without a zero-knowledge "
    "proof). What remains: device-side update clipping, which only honest devices enforce (a malicious device "
    "simply skips it, as the 'scaled' attacker here does); DP noise, which bounds the influence of one device "
    "only when its update was honestly clipped; and checks on the aggregate itself (its norm, its validation "
    "UAR), which can reject a poisoned round but not identify or exclude the poisoner."
)


def _trigger(wave: np.ndarray) -> np.ndarray:
    t = np.arange(len(wave)) / TRIGGER["sample_rate"]
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) or 1e-3
    tone = TRIGGER["relative_amplitude"] * rms * np.sqrt(2) * np.sin(2 * np.pi * TRIGGER["frequency_hz"] * t)
    return (wave + tone).astype(np.float32)


def _triggered(corpus, extractor, device: Device) -> torch.Tensor:
    """Raw features of ``device``'s utterances with the trigger added to their waveforms."""
    _, waves, _ = corpus.load_speaker(device.speaker)
    if len(waves) != len(device):
        raise ValueError(f"speaker {device.speaker}: {len(waves)} waveforms but {len(device)} feature rows")
    return extract(extractor, [_trigger(w) for w in waves])


def _strategy(defence: str, n: int, k: int) -> tuple[Callable | None, str | None]:
    """(a factory of the defence's Flower strategy, or None; the reason it does not apply, or None)."""
    common = {"fit_metrics_aggregation_fn": no_metrics}
    if defence in ("none", "clipping", "clipping_dp"):
        return (lambda: FedAvg(**common)), None
    if defence == "median":
        return (lambda: FedMedian(**common)), None
    if defence == "trimmed_mean":
        return (lambda: FedTrimmedAvg(beta=0.2, **common)), None
    if defence == "krum":
        if n < 2 * k + 3:
            return None, f"Krum needs n >= 2k + 3 devices; n = {n}, k = {k}"
        return (lambda: Krum(num_malicious_clients=k, num_clients_to_keep=n - k, **common)), None
    if defence == "bulyan":
        if n < 4 * k + 3:
            return None, f"Bulyan needs n >= 4k + 3 devices; n = {n}, k = {k}"
        return (lambda: Bulyan(num_malicious_clients=k, to_keep=0, **common)), None
    raise ValueError(f"unknown defence {defence!r}; choose from {DEFENCES}")


def poisoning_audit(clean_cfg, private_cfg, ks: Sequence[int] = (0, 1, 2), attacks: Sequence[str] = ATTACKS,
                    rounds: int = 10, defences: Sequence[str] = DEFENCES, clipping_norm: float | None = None,
                    progress: Callable[[str], None] = print) -> dict:
    """Every (attack, k, defence) cell: held-out UAR and backdoor success, or why the defence does not apply.

    ``clean_cfg`` is a non-private experiment (``privacy=none``-like), ``private_cfg`` the private one used by
    ``clipping_dp``; ``clipping_norm`` (default: ``clean_cfg``'s ``privacy.update_clipping.clipping_norm``) is
    the server-side clip of ``clipping``. k = 0 is computed once and reported under every attack."""
    clean, private = AuditFederation(clean_cfg), AuditFederation(private_cfg)
    norm = float(clipping_norm if clipping_norm is not None
                 else clean_cfg.privacy.update_clipping.clipping_norm)
    labels = list(clean_cfg.labels)
    target = labels.index("neutral") if "neutral" in labels else 0
    honest, tests = corpus_devices(clean_cfg, "train"), corpus_devices(clean_cfg, "test")
    n = len(honest)
    if max(ks) > n:
        raise ValueError(f"k = {max(ks)} malicious devices of only {n}")
    test_y = torch.cat([d.y for d in tests])
    corpus, extractor = corpus_from_config(clean_cfg), extractor_from_config(clean_cfg)  # built once, not per speaker
    test_trig = [_triggered(corpus, extractor, d) for d in tests]
    attacker_trig = ({d.speaker: _triggered(corpus, extractor, d) for d in honest[:max(ks)]}
                     if "backdoor" in attacks else {})

    def measure(fed: AuditFederation, arrays) -> tuple[float, float]:
        model = fed.classifier(arrays)
        pred = torch.cat([predict(model, fed.standardised(d)).argmax(1) for d in tests])
        # a test speaker holding clean and triggered utterances standardises them together (as the attacker did)
        trig = torch.cat([predict(model, fed.standardised(Device(d.speaker, d.sex, torch.cat([d.x, t]),
                                                                 torch.cat([d.y, d.y]))))[len(d):].argmax(1)
                          for d, t in zip(tests, test_trig, strict=True)])
        off_target = test_y != target
        return round(uar(test_y.numpy(), pred.numpy()), 4), round(float((trig[off_target] == target).float()
                                                                        .mean()), 4)

    def federation(attack: str, k: int, defence: str) -> tuple[float, float]:
        fed = private if defence == "clipping_dp" else clean
        server_norm = norm if defence == "clipping" else (fed.clipping_norm if defence == "clipping_dp" else None)
        devices = list(honest)
        for i in range(k):
            d = honest[i]
            if attack == "label_flip":
                devices[i] = Device(d.speaker, d.sex, d.x, len(labels) - 1 - d.y)
            elif attack == "backdoor":
                devices[i] = Device(d.speaker, d.sex, torch.cat([d.x, attacker_trig[d.speaker]]),
                                    torch.cat([d.y, torch.full_like(d.y, target)]))

        def contribute(_r, i, device, arrays, x):
            update = fed.contribution(arrays, device, len(devices), x)
            if attack == "scaled" and i < k:
                update = [(-BOOST * u).astype(u.dtype) for u in update]
            if server_norm is None:
                return update
            return [c.astype(u.dtype) for c, u in zip(clip_norm(update, server_norm), update, strict=True)]

        strategy_of, _ = _strategy(defence, n, k)
        return measure(fed, fed.run(devices, rounds, strategy_of=strategy_of, contribute=contribute))

    rows = []
    for k in ks:
        for defence in defences:
            _, reason = _strategy(defence, n, k)
            cells = ["clean"] if k == 0 else list(attacks)
            for attack in cells:
                score, success = (None, None) if reason else federation(attack, k, defence)
                for name in (attacks if k == 0 else [attack]):
                    rows.append({"attack": name, "k": k, "n": n, "defence": defence, "uar": score,
                                 "backdoor_success": success if name == "backdoor" else None,
                                 "applicable": reason is None, "reason": reason})
                progress(f"poisoning: k={k} {defence:>12} {attack:>10}: "
                         + (f"not applicable ({reason})" if reason else f"UAR {score}, backdoor {success}"))
    return {"rows": rows, "secagg_note": SECAGG_NOTE, "target_emotion": labels[target], "trigger": dict(TRIGGER),
            "boost": BOOST, "rounds": rounds, "clipping_norm": norm}


def plot_poisoning(result: dict, path) -> None:
    """UAR against k per defence, one panel per attack, plus backdoor success for the backdoor; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["applicable"]]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    panels = [(a, "uar") for a in attacks] + ([("backdoor", "backdoor_success")] if "backdoor" in attacks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (attack, metric) in zip(axes[0], panels, strict=True):
        for defence in dict.fromkeys(r["defence"] for r in rows):
            cell = sorted((r["k"], r[metric]) for r in rows if r["attack"] == attack and r["defence"] == defence)
            if cell:
                ax.plot(*zip(*cell, strict=True), marker="o", label=defence)
        ax.set_title(f"{attack}: {'held-out UAR' if metric == 'uar' else 'backdoor success'}")
        ax.set_xlabel("malicious devices k")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
