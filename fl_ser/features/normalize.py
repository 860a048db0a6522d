"""Device-local feature standardisation.

Each device fits the mean/std of its *own* features; the statistics live in buffers, so
they are never trained and never part of ``parameters()`` (the federated update sends
parameters only). The normaliser is scriptable and sits between extractor and classifier
in the released TorchScript artifact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureNormalizer(nn.Module):
    """``forward(x) = (x - mean) / std``, identity until :meth:`fit` is called.

    * ``kind == "sequence"``, ``shape == (C, F, T)``: statistics per channel and frequency
      bin, pooled over utterances and time; buffers have shape ``(C, F, 1)``.
    * ``kind == "vector"``, ``shape == (D,)``: statistics per feature; buffers ``(D,)``.

    The std is floored at ``min_std`` (absolute) so constant features do not explode.
    """

    def __init__(self, shape: tuple[int, ...], kind: str, min_std: float = 1e-3) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if kind == "sequence":
            if len(shape) != 3:
                raise ValueError(f"sequence features need shape (C, F, T), got {shape}")
            stat_shape = (shape[0], shape[1], 1)
        elif kind == "vector":
            if len(shape) != 1:
                raise ValueError(f"vector features need shape (D,), got {shape}")
            stat_shape = shape
        else:
            raise ValueError(f"kind must be 'sequence' or 'vector', got {kind!r}")
        self.shape = shape
        self.kind = kind
        self.min_std = float(min_std)
        self.register_buffer("mean", torch.zeros(stat_shape))
        self.register_buffer("std", torch.ones(stat_shape))

    @torch.no_grad()
    def fit(self, features: Tensor) -> FeatureNormalizer:
        """Set ``mean``/``std`` from ``features[N, *shape]`` (a device's own data); returns self."""
        if self.kind == "sequence":  # any number of frames is fine, channels and bins must match
            ok = features.dim() == 4 and tuple(features.shape[1:3]) == self.shape[:2]
        else:
            ok = tuple(features.shape[1:]) == self.shape
        if not ok:
            raise ValueError(f"expected features of shape (N, {self.shape}), got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("cannot fit on zero utterances")
        x = features.detach().to(torch.float64)
        dims = (0, 3) if self.kind == "sequence" else (0,)
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        if self.kind == "sequence":
            var, mean = var.unsqueeze(-1), mean.unsqueeze(-1)
        std = var.sqrt().clamp_min(self.min_std)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
