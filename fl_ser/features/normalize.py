"""Feature standardisation modules: fixed statistics, or each utterance's own.

:class:`FeatureNormalizer` applies a mean/std held in buffers (never trained,
never part of ``parameters()``, so the federated update never carries them).
Where those statistics come from is a privacy decision, made in
:mod:`fl_ser.privacy.normalization`. :class:`UtteranceNormalizer` standardises
each time-frequency map with its own statistics over time (per-utterance
CMVN): it depends on no other utterance, so it needs no statistics at all.
Both are scriptable and sit between extractor and classifier in the release.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def statistics_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The shape of the mean/std buffers for features of ``shape`` and ``kind``."""
    shape = tuple(int(s) for s in shape)
    if kind == "sequence":
        if len(shape) != 3:
            raise ValueError(f"sequence features need shape (C, F, T), got {shape}")
        return (shape[0], shape[1], 1)
    if kind == "vector":
        if len(shape) != 1:
            raise ValueError(f"vector features need shape (D,), got {shape}")
        return shape
    raise ValueError(f"kind must be 'sequence' or 'vector', got {kind!r}")


class FeatureNormalizer(nn.Module):
    """``forward(x) = (x - mean) / std``, identity until statistics are set.

    * ``kind == "sequence"``, ``shape == (C, F, T)``: statistics per channel and frequency
      bin, pooled over utterances and time; buffers have shape ``(C, F, 1)``.
    * ``kind == "vector"``, ``shape == (D,)``: statistics per feature; buffers ``(D,)``.

    The std is floored at ``min_std`` (absolute) so constant features do not explode; with ``bound > 0`` the
    standardised values are clamped to ``+-bound`` (statistics that do not fit the data, e.g. public ones, then
    cannot produce extreme inputs).
    """

    def __init__(self, shape: tuple[int, ...], kind: str, min_std: float = 1e-3, bound: float = 0.0) -> None:
        super().__init__()
        stat_shape = statistics_shape(shape, kind)
        self.shape = tuple(int(s) for s in shape)
        self.kind = kind
        self.min_std = float(min_std)
        self.bound = float(bound)  # > 0: standardised values are clamped to +-bound
        self.register_buffer("mean", torch.zeros(stat_shape))
        self.register_buffer("std", torch.ones(stat_shape))

    @torch.no_grad()
    def fit(self, features: Tensor) -> FeatureNormalizer:
        """Set ``mean``/``std`` from ``features[N, *shape]``; returns self."""
        var, mean = moments(features, self.shape, self.kind)
        return self.set_statistics(mean, var.sqrt())

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, std: Tensor) -> FeatureNormalizer:
        """Use the given statistics (shaped like the buffers); returns self."""
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if tuple(mean.shape) != tuple(self.mean.shape) or tuple(std.shape) != tuple(self.std.shape):
            raise ValueError(f"statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} do not fit features "
                             f"{self.shape} ({self.kind}); expected {tuple(self.mean.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("normaliser statistics must be finite")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.clamp_min(self.min_std).to(self.std.dtype))
        return self

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        if self.bound > 0:
            z = z.clamp(-self.bound, self.bound)
        return z


@torch.no_grad()
def moments(features: Tensor, shape: tuple[int, ...], kind: str) -> tuple[Tensor, Tensor]:
    """(variance, mean) of ``features[N, *shape]`` pooled as :class:`FeatureNormalizer` pools them."""
    if kind == "sequence":  # any number of frames is fine, channels and bins must match
        ok = features.dim() == 4 and tuple(features.shape[1:3]) == tuple(shape[:2])
    else:
        ok = tuple(features.shape[1:]) == tuple(shape)
    if not ok:
        raise ValueError(f"expected features of shape (N, {tuple(shape)}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("cannot fit on zero utterances")
    x = features.detach().to(torch.float64)
    dims = (0, 3) if kind == "sequence" else (0,)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    if kind == "sequence":
        var, mean = var.unsqueeze(-1), mean.unsqueeze(-1)
    return var, mean


class UtteranceNormalizer(nn.Module):
    """Per-utterance standardisation of (B, C, F, T) maps over time: each bin by its own mean/std in that utterance.

    It reads nothing but the utterance it normalises, so one utterance never changes another's features:
    DP-SGD's per-example sensitivity argument holds unchanged. Vector features (functionals) have no time
    axis to normalise over, and are refused.
    """

    def __init__(self, shape: tuple[int, ...], kind: str, min_std: float = 1e-3) -> None:
        super().__init__()
        if kind != "sequence":
            raise ValueError("per-utterance normalisation needs time-frequency features (features=logmel or mfcc); "
                             "functionals are one vector per utterance, with no time axis to normalise over")
        statistics_shape(shape, kind)
        self.shape = tuple(int(s) for s in shape)
        self.kind = kind
        self.min_std = float(min_std)

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) / var.sqrt().clamp_min(self.min_std)
