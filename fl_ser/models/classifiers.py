"""The trainable part of the emotion model: a compact CNN on spectrogram-like
features, an MLP on utterance-level functionals, and a polynomial MLP that can
also be evaluated on CKKS ciphertexts (encrypted inference, :mod:`fl_ser.models.encrypted`).

Only these classifiers' parameters are ever federated; the feature extractor is
fixed signal processing and the normaliser holds device-local statistics. Sizes
are chosen with DP in mind: the Gaussian noise DP-SGD adds has the same norm per
step whatever the model size, so every extra parameter dilutes the signal.
GroupNorm/LayerNorm replace BatchNorm, which mixes samples and breaks per-sample
gradient clipping (Opacus's ModuleValidator rejects it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def feed_forward(name: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int],
                 after_linear: Callable[[int], list[nn.Module]]) -> nn.Sequential:
    """Linear layers of widths ``hidden``, each followed by ``after_linear(width)``, then the output layer."""
    if len(input_shape) != 1:
        raise ValueError(f"{name} needs vector features of shape (D,), got {tuple(input_shape)}")
    layers: list[nn.Module] = []
    width = int(input_shape[0])
    for h in map(int, hidden):
        layers += [nn.Linear(width, h), *after_linear(h)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Feed-forward classifier on a feature vector of shape (D,)."""

    expects = "vector"

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 32),
                 dropout: float = 0.1):
        super().__init__()
        self.net = feed_forward("MLP", input_shape, num_classes, hidden,
                                lambda h: [nn.LayerNorm(h), nn.ReLU(), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PolyActivation(nn.Module):
    """``c0 + c1 x + c2 x^2`` with fixed coefficients: the least-squares quadratic fit of ReLU on ``[-r, r]``
    (``3r/32 + x/2 + 15x^2/(32r)``). A degree-2 polynomial costs one CKKS multiplication, where ReLU cannot be
    evaluated on ciphertexts at all; fixed (not trained) coefficients keep every trained parameter in an
    ``nn.Linear`` for Opacus, and a fit to ReLU keeps the activation's growth gentle on standardised inputs."""

    def __init__(self, fit_range: float = 4.0):
        super().__init__()
        if not fit_range > 0:
            raise ValueError(f"PolyActivation fit_range must be positive, got {fit_range}")
        r = float(fit_range)
        self.c0, self.c1, self.c2 = 3 * r / 32, 0.5, 15 / (32 * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c0 + self.c1 * x + self.c2 * x * x


class PolyMLP(nn.Module):
    """Feed-forward classifier on a feature vector of shape (D,) built only from what CKKS evaluates:
    ``nn.Linear`` layers and :class:`PolyActivation` (no LayerNorm, no ReLU, no dropout, no softmax)."""

    expects = "vector"

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (32,),
                 fit_range: float = 4.0):
        super().__init__()
        self.net = feed_forward("PolyMLP", input_shape, num_classes, hidden, lambda h: [PolyActivation(fit_range)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Small 2-D CNN on (channels, frequency, time) features, pooled over time and frequency."""

    expects = "sequence"

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32, 48),
                 groups: int = 4, dropout: float = 0.2):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs (channels, freq, time) features, got {tuple(input_shape)}")
        blocks: list[nn.Module] = []
        width = int(input_shape[0])
        for c in channels:
            blocks += [
                nn.Conv2d(width, int(c), kernel_size=3, padding=1),
                nn.GroupNorm(min(groups, int(c)), int(c)),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            width = int(c)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(2)  # (B, C, F*T)
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        return self.head(pooled)


def build_classifier(model_cfg, input_shape: Sequence[int], feature_kind: str, num_classes: int) -> nn.Module:
    """Instantiate the configured classifier for a feature shape, with a clear error on mismatch."""
    from hydra.utils import get_class, instantiate

    cls = get_class(model_cfg["_target_"])
    if getattr(cls, "expects", feature_kind) != feature_kind:
        hint = "model=cnn (with features=logmel or features=mfcc)" if feature_kind == "sequence" else \
            "model=mlp (with features=functionals)"
        raise ValueError(
            f"{cls.__name__} expects {cls.expects} features but the configured features give "
            f"{feature_kind} features of shape {tuple(input_shape)}; use {hint}."
        )
    return instantiate(model_cfg, input_shape=list(input_shape), num_classes=num_classes)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
