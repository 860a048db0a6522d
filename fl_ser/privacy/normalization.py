"""Feature normalisation inside the privacy guarantee: where a device's standardising statistics come from.

DP-SGD's sample-level guarantee assumes that one utterance changes one training
example. Standardising every example with the mean and std of *all* the
device's utterances breaks that: one utterance then moves every normalised
example, and the accountant's epsilon no longer covers what is released. Each
``privacy.normalization.mode`` below either keeps the guarantee or is refused
where it would not:

``public``
    Statistics computed from public data only: the built-in synthetic corpus
    (``reference: synthetic``, generated from a fixed public seed, distinct
    from any experiment's speakers) or a statistics file made from a public
    corpus (``reference: /path/to/stats.json``, written by
    ``python -m experiments.reference_stats``). No private data, no privacy cost.
``dp``
    The device's own statistics released with the Gaussian mechanism, composed
    into the same ledger as DP-SGD. Each utterance's features are mapped to
    ``u = clip((x - m_ref) / (k s_ref), -1, 1)`` with public reference
    statistics ``m_ref, s_ref`` and ``k = clip_stds``; for sequence features
    each utterance contributes its time-averaged ``u`` and ``u^2`` per bin. One
    utterance contributes ``v = [mean u, mean u^2, sqrt(D)]`` (the last
    coordinate counts utterances), so ``||v||_2 <= sqrt(3 D)`` for D statistics,
    and adding or removing an utterance (Opacus's adjacency) moves the sum by
    at most that. The device releases ``sum v + N(0, (z sqrt(3 D))^2 I)`` once:
    one Gaussian mechanism with noise multiplier ``z = noise_multiplier``, an
    entry ``(z, q=1, steps=1)`` in the ledger, which RDP and PRV both compose
    with DP-SGD's. Mean and std follow by post-processing. The released
    statistics are kept in the device's ledger and reused while its data is
    unchanged, so they are paid for once, not once per round.
``utterance``
    Each time-frequency map standardised with its own statistics
    (:class:`~fl_ser.features.normalize.UtteranceNormalizer`): no other
    utterance is involved, so DP-SGD's argument holds as is. Sequence
    features only.
``local``
    Fitted on all of the device's own utterances (the earlier behaviour).
    Sound only where no sample-level guarantee is claimed: without privacy,
    and under user-level DP alone (the unit is the speaker's whole data, and
    normalisation is part of the speaker's computation). Refused with DP-SGD.

The server's evaluation of held-out speakers normalises each of them exactly
as its device would (with ``dp``, through the same noisy release), and the
published release carries the public reference statistics (``utterance``:
none), never statistics of any speaker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fl_ser.features.normalize import FeatureNormalizer, UtteranceNormalizer, moments, statistics_shape
from fl_ser.privacy.accountant import PrivacyBudgetError

MODES = ("public", "dp", "utterance", "local")
#: The synthetic reference corpus: public, and from a seed no experiment uses for its own speakers.
REFERENCE_SEED = 2_147_483_629
REFERENCE_SPEAKERS = 8
REFERENCE_TAKES = 3  # utterances per speaker and emotion
#: A released std is kept within [STD_FLOOR, 1] x k s_ref (the variance estimate is noisy; this is post-processing).
STD_FLOOR = 0.05


@dataclass(frozen=True)
class Statistics:
    """Standardising statistics, shaped like :class:`FeatureNormalizer`'s buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def to_json(self) -> dict:
        return {"shape": list(self.mean.shape), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Statistics:
        shape = tuple(int(s) for s in data["shape"])
        mean = torch.tensor(data["mean"], dtype=torch.float64).reshape(shape)
        std = torch.tensor(data["std"], dtype=torch.float64).reshape(shape)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("statistics must be finite with a positive std")
        return cls(mean, std)


@dataclass(frozen=True)
class Normalization:
    """One experiment's normalisation: the mode, the public reference, and (``dp``) the mechanism's settings."""

    mode: str
    shape: tuple[int, ...]
    kind: str
    reference: Statistics | None  # public statistics (None only for ``utterance`` and ``local``)
    noise_multiplier: float = 0.0
    clip_stds: float = 3.0
    bound: float = 0.0  # > 0: standardised features clamped to +-bound (a fixed, public transform)

    @property
    def num_statistics(self) -> int:
        """D: how many means (and as many second moments) one release holds."""
        return math.prod(statistics_shape(self.shape, self.kind))

    @property
    def sensitivity(self) -> float:
        """L2 norm bound of one utterance's contribution ``[mean u, mean u^2, sqrt(D)]``."""
        return math.sqrt(3 * self.num_statistics)

    @property
    def spends_privacy(self) -> bool:
        return self.mode == "dp"

    def mechanism(self) -> tuple[float, float, int]:
        """The ledger entry of one release: the Gaussian mechanism, (noise multiplier, sample rate 1, one step)."""
        return (self.noise_multiplier, 1.0, 1)

    @property
    def key(self) -> str:
        """What a stored release depends on besides the data: a device reuses a release only for the same key."""
        ref = None if self.reference is None else self.reference.to_json()
        text = json.dumps([self.mode, self.shape, self.kind, self.noise_multiplier, self.clip_stds, ref])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @torch.no_grad()
    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Each utterance's row ``[mean u, mean u^2, sqrt(D)]`` (N, 2D + 1), of L2 norm at most :attr:`sensitivity`."""
        scale = self.clip_stds * self.reference.std
        u = ((x.to(torch.float64) - self.reference.mean) / scale).clamp(-1.0, 1.0)
        if self.kind == "sequence":  # per utterance: time-averaged u and u^2 per bin, each in [-1, 1] / [0, 1]
            first, second = u.mean(dim=-1, keepdim=True), u.pow(2).mean(dim=-1, keepdim=True)
        else:
            first, second = u, u.pow(2)
        count = torch.full((len(x), 1), math.sqrt(self.num_statistics), dtype=torch.float64)
        return torch.cat([first.flatten(1), second.flatten(1), count], dim=1)

    @torch.no_grad()
    def release(self, x: torch.Tensor) -> Statistics:
        """``dp``: the device's statistics of ``x`` through the Gaussian mechanism (the caller records the spend)."""
        from fl_ser.privacy.noise import add_gaussian

        if self.mode != "dp":
            raise ValueError(f"normalisation mode {self.mode!r} releases no statistics")
        total = self.contributions(x).sum(0)
        noisy = torch.from_numpy(add_gaussian([total.numpy()], self.noise_multiplier * self.sensitivity)[0])
        d = self.num_statistics  # post-processing from here on
        n = max(float(noisy[-1]) / math.sqrt(d), 1.0)
        mean_u = (noisy[:d] / n).clamp(-1.0, 1.0)
        var_u = (noisy[d:2 * d] / n - mean_u.pow(2)).clamp(STD_FLOOR**2, 1.0)
        shape, scale = self.reference.mean.shape, self.clip_stds * self.reference.std
        return Statistics(self.reference.mean + scale * mean_u.reshape(shape), scale * var_u.sqrt().reshape(shape))

    def module(self, x: torch.Tensor | None = None, released: Statistics | None = None) -> nn.Module:
        """The normaliser a device applies: from ``released`` (``dp``), fitted on ``x`` (``local``), or fixed."""
        if self.mode == "utterance":
            return UtteranceNormalizer(self.shape, self.kind)
        norm = FeatureNormalizer(self.shape, self.kind, bound=self.bound)
        if self.mode == "local":
            if x is None:
                raise ValueError("local normalisation needs the device's features")
            return norm.fit(x)
        stats = released if self.mode == "dp" else self.reference
        if stats is None:
            raise ValueError("dp normalisation needs the device's released statistics")
        return norm.set_statistics(stats.mean, stats.std)

    @torch.no_grad()
    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised as a device of this experiment would (``dp``: through a fresh release, recorded in
        no ledger): for the server's held-out speakers, baselines and benchmarks."""
        return self.module(x, self.release(x) if self.spends_privacy else None)(x)

    def published(self) -> nn.Module:
        """The normaliser in the public release: the public reference (no speaker's statistics)."""
        if self.mode == "utterance":
            return UtteranceNormalizer(self.shape, self.kind)
        norm = FeatureNormalizer(self.shape, self.kind, bound=self.bound)
        return norm.set_statistics(self.reference.mean, self.reference.std) if self.reference is not None else norm


def sample_level_dp(cfg: DictConfig) -> bool:
    return bool(cfg.privacy.dp_sgd.enabled)


def check(cfg: DictConfig) -> None:
    """Refuse a normalisation that breaks the configured guarantee, naming the fix (raises PrivacyBudgetError)."""
    norm = cfg.privacy.normalization
    mode = str(norm.mode)
    if mode not in MODES:
        raise PrivacyBudgetError(f"privacy.normalization.mode={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "local" and sample_level_dp(cfg):
        raise PrivacyBudgetError(
            "privacy.normalization.mode=local fits each device's normaliser on all its utterances, so one utterance "
            "changes every training example and DP-SGD's sample-level epsilon would not cover the release. Use "
            "privacy.normalization.mode=public (public statistics), dp (statistics released inside the ledger) or, "
            "for features=logmel/mfcc, utterance.")
    if mode == "dp" and not float(norm.noise_multiplier) > 0:
        raise PrivacyBudgetError("privacy.normalization.mode=dp needs privacy.normalization.noise_multiplier > 0")
    if mode == "dp" and not sample_level_dp(cfg):
        raise PrivacyBudgetError("privacy.normalization.mode=dp spends sample-level budget, but DP-SGD is off "
                                 "(privacy.dp_sgd.enabled=false); use mode=local or public")
    if float(norm.clip_stds) <= 0:
        raise PrivacyBudgetError("privacy.normalization.clip_stds must be positive")


def from_config(cfg: DictConfig) -> Normalization:
    """The experiment's normalisation (the reference statistics are computed once per machine and cached)."""
    from fl_ser.task import extractor_from_config

    check(cfg)
    norm = cfg.privacy.normalization
    ext = extractor_from_config(cfg)
    shape, kind = tuple(int(s) for s in ext.output_shape), str(ext.kind)
    if norm.mode == "utterance" and kind != "sequence":
        raise PrivacyBudgetError("privacy.normalization.mode=utterance needs time-frequency features "
                                 "(features=logmel or mfcc); functionals are one vector per utterance, with no time "
                                 "axis to normalise over. Use mode=public or dp.")
    reference = None if norm.mode in ("utterance", "local") else reference_statistics(cfg)
    return Normalization(str(norm.mode), shape, kind, reference, float(norm.noise_multiplier), float(norm.clip_stds),
                         float(norm.get("bound") or 0.0))


def reference_statistics(cfg: DictConfig) -> Statistics:
    """Public statistics of the experiment's features: the synthetic reference corpus, or a statistics file."""
    where = str(cfg.privacy.normalization.reference)
    features = OmegaConf.to_container(cfg.features, resolve=True)
    if where != "synthetic":
        return _statistics_file(where, json.dumps(features, sort_keys=True))
    return _synthetic_reference(json.dumps(features, sort_keys=True), str(cfg.cache_dir))


def _statistics_file(path: str, features_json: str) -> Statistics:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PrivacyBudgetError(f"privacy.normalization.reference={path}: no such file. Give `synthetic`, or a "
                                 "statistics file written by `python -m experiments.reference_stats`.")
    try:
        data = json.loads(file.read_text())
        stats = Statistics.from_json(data)
    except (ValueError, KeyError, TypeError) as err:
        raise PrivacyBudgetError(f"{file}: not a statistics file ({err}); rewrite it with "
                                 "`python -m experiments.reference_stats`") from None
    if json.dumps(data.get("features"), sort_keys=True) != features_json:
        raise PrivacyBudgetError(f"{file} holds statistics of other features ({data.get('features')}) than this "
                                 f"experiment's ({features_json}); compute them for these features")
    return stats


def statistics_of(x: torch.Tensor, shape: tuple[int, ...], kind: str) -> Statistics:
    """Plain (non-private) statistics of features ``x``: for public data only."""
    var, mean = moments(x, shape, kind)
    return Statistics(mean, var.sqrt())


@functools.lru_cache(maxsize=4)
def _synthetic_reference(features_json: str, cache_dir: str) -> Statistics:
    """Statistics of the synthetic reference corpus' features (cached on disk: a few seconds to compute once)."""
    from hydra.utils import instantiate

    from fl_ser.data.synthetic import SyntheticCorpus
    from fl_ser.task import extract

    key = hashlib.sha256(f"{features_json}|{REFERENCE_SEED}|{REFERENCE_SPEAKERS}|{REFERENCE_TAKES}".encode())
    cache = Path(cache_dir) / "reference" / f"{key.hexdigest()[:16]}.json"
    if cache.is_file():
        return Statistics.from_json(json.loads(cache.read_text()))
    extractor = instantiate(json.loads(features_json)).eval()
    corpus = SyntheticCorpus(num_speakers=REFERENCE_SPEAKERS, utterances_per_emotion=REFERENCE_TAKES,
                             seed=REFERENCE_SEED)
    waves = [w for spk in corpus.speakers for w in corpus.load_speaker(spk)[1]]
    stats = statistics_of(extract(extractor, waves), tuple(extractor.output_shape), str(extractor.kind))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"features": json.loads(features_json), "source": repr(corpus), **stats.to_json()}))
    tmp.replace(cache)  # atomic: devices that compute it at the same time never read half a file
    return stats

