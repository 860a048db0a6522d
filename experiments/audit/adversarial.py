"""Adversarial audio against the release: how far a small, bounded waveform perturbation moves its predictions.

The attack is untargeted L-infinity PGD (Madry et al. 2018) on the released :class:`~fl_ser.models.pipeline.
EmotionPipeline`, gradients flowing from the probabilities back through the classifier, the published normaliser
and the torchaudio feature extractor to the waveform. It maximises the cross-entropy of the *true label* (the
standard robust-accuracy attack: a correct prediction is pushed away, a wrong one kept wrong).

Each utterance's budget is set by a signal-to-noise ratio: ``eps = rms(x) * 10 ** (-snr_db / 20)``. Since
``|delta| <= eps`` sample-wise, ``rms(delta) <= eps`` and the perturbation's SNR is at least ``snr_db``; the
achieved SNR is measured and reported. PGD starts from zero and takes ``steps`` signed-gradient steps of
``eps * step_fraction``, projected onto the L-inf ball (and the waveform kept in [-1, 1]).

With ``features=functionals`` not every feature has a gradient: voicing and activity masks, the pitch tracker's
lag choice (argmax), zero-crossing rate and percentile ranks are piecewise constant in the waveform. PGD uses
what remains (loudness, spectral, MFCC, NCCF-peak and masked-statistic values), which is enough to flip most
predictions (see the test). A random-sign baseline of the same L-inf size shows the attack, not the noise,
does the work.

Utterances of equal length are attacked as one batch (the extractors take ``(B, samples)``); others alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from experiments.audit.stats import uar
from fl_ser.data.corpus import corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.task import label_index


def held_out_utterances(cfg: DictConfig, max_utterances: int | None = None,
                        seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """The held-out speakers' waveforms and true class indices; a seeded random ``max_utterances`` of them."""
    corpus = corpus_from_config(cfg)
    waves, labels = [], []
    for spk in split_from_config(cfg, corpus).test:
        utts, spk_waves, _ = corpus.load_speaker(spk)
        waves += [np.asarray(w, dtype=np.float32) for w in spk_waves]
        labels += [label_index(cfg, corpus, u) for u in utts]
    keep = np.random.default_rng(seed).permutation(len(waves))[:max_utterances]
    return [waves[i] for i in sorted(keep)], np.array([labels[i] for i in sorted(keep)], dtype=np.int64)


def _batches(waves: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of ``waves`` grouped by equal length, in chunks of at most ``batch_size``."""
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(waves):
        by_len.setdefault(len(w), []).append(i)
    return [idx[k : k + batch_size] for idx in by_len.values() for k in range(0, len(idx), batch_size)]


def _log_probs(release: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.log(release(x).clamp_min(1e-12))


def pgd(release: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, steps: int,
        step_fraction: float = 0.25) -> torch.Tensor:
    """Untargeted L-inf PGD: a perturbation ``delta`` with ``|delta| <= eps`` (per row of ``x``, shape (B, 1))
    that maximises the cross-entropy of ``target`` (B,) under ``release``; ``x + delta`` stays in [-1, 1]."""
    delta = torch.zeros_like(x)
    alpha = eps * step_fraction
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = torch.nn.functional.nll_loss(_log_probs(release, x + delta), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(-1.0, 1.0) - x
    return delta.detach()


def _snr_db(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    noise = delta.pow(2).mean(-1).sqrt()
    return 20.0 * torch.log10(x.pow(2).mean(-1).sqrt() / noise.clamp_min(1e-30))


def adversarial_audit(cfg: DictConfig, release: torch.nn.Module, snrs: Sequence[float | None] = (None, 50, 40, 35, 30),
                      steps: int = 10, max_utterances: int | None = 100, step_fraction: float = 0.25,
                      batch_size: int = 32, seed: int = 0, progress: Callable[[str], None] = print) -> dict:
    """Robust accuracy of ``release`` (an EmotionPipeline) on held-out test utterances under PGD at each SNR.

    ``snrs``: perturbation SNRs in dB (``None``: clean). Returns ``{"rows": [...], "attack": {...}}``, one row per
    SNR with ``snr_db``, ``eps_mean`` (mean L-inf budget), ``accuracy`` and ``uar`` under attack,
    ``random_accuracy`` (uniform random-sign noise of the same L-inf size), ``flipped`` / ``random_flipped``
    (fraction of correctly classified clean utterances whose prediction changed), ``achieved_snr_db_min`` (the
    lowest measured SNR of any perturbation, >= ``snr_db``) and ``n``; all JSON-able."""
    start = time.perf_counter()
    release = release.eval().requires_grad_(False)
    waves, y = held_out_utterances(cfg, max_utterances, seed)
    groups = _batches(waves, batch_size)
    gen = torch.Generator().manual_seed(seed)
    clean = np.empty(len(waves), dtype=np.int64)
    with torch.no_grad():
        for idx in groups:
            clean[idx] = release(torch.from_numpy(np.stack([waves[i] for i in idx]))).argmax(-1).numpy()
    correct = clean == y
    rows = []
    for snr in snrs:
        t0 = time.perf_counter()
        adv, rnd = clean.copy(), clean.copy()
        eps_all = np.zeros(len(waves))
        achieved = []
        if snr is not None:
            for idx in groups:
                x = torch.from_numpy(np.stack([waves[i] for i in idx]))
                eps = x.pow(2).mean(-1, keepdim=True).sqrt() * 10.0 ** (-float(snr) / 20.0)
                delta = pgd(release, x, torch.from_numpy(y[idx]), eps, steps, step_fraction)
                noise = eps * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x.dtype)
                noise = (x + noise).clamp(-1.0, 1.0) - x
                with torch.no_grad():
                    adv[idx] = release(x + delta).argmax(-1).numpy()
                    rnd[idx] = release(x + noise).argmax(-1).numpy()
                eps_all[idx] = eps.squeeze(-1).numpy()
                achieved.append(_snr_db(x, delta))
        min_snr = float(torch.cat(achieved).min()) if achieved else math.inf
        row = {"snr_db": None if snr is None else float(snr), "eps_mean": float(eps_all.mean()),
               "accuracy": float(np.mean(adv == y)), "uar": uar(y, adv),
               "random_accuracy": float(np.mean(rnd == y)),
               "flipped": float(np.mean(adv[correct] != clean[correct])) if correct.any() else 0.0,
               "random_flipped": float(np.mean(rnd[correct] != clean[correct])) if correct.any() else 0.0,
               "achieved_snr_db_min": None if math.isinf(min_snr) else min_snr, "n": len(waves)}
        rows.append(row)
        progress(f"adversarial: snr {'clean' if snr is None else f'{snr:g} dB'}: accuracy {row['accuracy']:.3f} "
                 f"(random {row['random_accuracy']:.3f}), flipped {row['flipped']:.3f}, "
                 f"min SNR {row['achieved_snr_db_min']}, {time.perf_counter() - t0:.1f} s")
    attack = {"method": "PGD, L-inf, untargeted", "objective": "cross-entropy of the true label",
              "steps": int(steps), "step_size": f"{step_fraction:g} * eps", "start": "zero",
              "eps": "rms(x) * 10 ** (-snr_db / 20) per utterance", "random_baseline": "uniform random sign * eps",
              "features": str(cfg.features.get("_target_", "")), "batches": len(groups),
              "seconds": round(time.perf_counter() - start, 2)}
    return {"rows": rows, "attack": attack}


def plot_adversarial(result: dict, path) -> None:
    """Write a PNG of accuracy (PGD and random noise) against perturbation SNR; clean accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    attacked = [r for r in rows if r["snr_db"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    snr = [r["snr_db"] for r in attacked]
    ax.plot(snr, [r["accuracy"] for r in attacked], "o-", label="PGD")
    ax.plot(snr, [r["random_accuracy"] for r in attacked], "s--", label="random sign noise")
    for r in rows:
        if r["snr_db"] is None:
            ax.axhline(r["accuracy"], color="grey", lw=0.8, label="clean")
    ax.invert_xaxis()
    ax.set_xlabel("perturbation SNR (dB)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
