"""Local training on a device: plain SGD, or DP-SGD through Opacus, returning exactly what the round spent.

Opacus's ``PrivacyEngine.make_private`` wraps a fresh classifier every round
(wrapping one module twice fails) with a fresh accountant; the round's
accountant history, ``(noise multiplier, sample rate, steps)`` entries, is
what the device records in its lifetime ledger (:mod:`fl_ser.privacy.ledger`),
so the epsilon it reports composes every round it ever trained in.
:func:`planned_entries` predicts those entries before training, so the device
can check its budget first.

The Gaussian noise comes from OpenDP's vetted sampler on its CSPRNG
(:func:`fl_ser.privacy.noise.with_vetted_noise`) unless ``vetted_noise`` is
off, which gives Opacus's own ``torch.normal`` draws (faster for small models,
see the benchmarks; not a cryptographic source). Batch sampling draws from a
torch generator seeded from OS entropy either way.

FedProx's proximal term does not depend on data, so it is applied as a separate
decoupled step after each optimiser step: Opacus's per-sample gradients (hooks
mode) would silently drop it from the loss, and as post-processing it costs no
privacy.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_ser.privacy.accountant import Entry, PrivacyBudgetError


@dataclass(frozen=True)
class DPSGDConfig:
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon_budget: float
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    poisson_sampling: bool = True
    vetted_noise: bool = True  # draw the Gaussian noise from OpenDP's sampler (fl_ser.privacy.noise), not torch's

    def __post_init__(self):
        if self.noise_multiplier <= 0:
            raise PrivacyBudgetError(f"DP-SGD needs noise_multiplier > 0, got {self.noise_multiplier}; "
                                     "use privacy=none for non-private training.")
        if self.epsilon_budget <= 0:
            raise PrivacyBudgetError(f"epsilon_budget must be positive, got {self.epsilon_budget}.")
        if self.max_grad_norm <= 0:
            raise PrivacyBudgetError(f"max_grad_norm must be positive, got {self.max_grad_norm}.")


@dataclass(frozen=True)
class LocalTrainConfig:
    epochs: int = 1
    batch_size: int | None = None  # None: the device's whole local set each step (DP-GD, sampling rate 1)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


def batch_size(num_examples: int, cfg: LocalTrainConfig) -> int:
    return num_examples if cfg.batch_size is None else min(cfg.batch_size, num_examples)


def steps_per_round(num_examples: int, cfg: LocalTrainConfig) -> int:
    """DP-SGD steps one round takes: epochs x ceil(n / batch) (Opacus's Poisson loader does the same)."""
    return cfg.epochs * math.ceil(num_examples / batch_size(num_examples, cfg))


def sample_rate(num_examples: int, cfg: LocalTrainConfig) -> float:
    return batch_size(num_examples, cfg) / num_examples


def planned_entries(num_examples: int, cfg: LocalTrainConfig, noise_multiplier: float) -> list[Entry]:
    """The accountant entries one round of DP-SGD on ``num_examples`` utterances will spend."""
    return [(float(noise_multiplier), sample_rate(num_examples, cfg), steps_per_round(num_examples, cfg))]


def train_local(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalTrainConfig,
                dp: DPSGDConfig | None = None) -> dict:
    """Train ``classifier`` in place for one round; returns mean loss, steps taken and (DP) the entries spent.

    With ``dp``, trains with Opacus DP-SGD; ``spent`` is this round's accountant history, which the caller
    records in the device's ledger before anything derived from the model leaves.
    """
    classifier.train()
    anchor = [p.detach().clone() for p in classifier.parameters()] if cfg.proximal_mu > 0 else None
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    # Fresh OS entropy for batch sampling and DP noise: never a configured seed, so the noise cannot be replayed.
    rng = torch.Generator().manual_seed(secrets.randbits(63))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size(len(x), cfg), shuffle=True, generator=rng)
    model: nn.Module = classifier
    engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # see README: limits
            engine = PrivacyEngine(accountant=dp.accountant)
            model, optimizer, loader = engine.make_private(
                module=classifier, optimizer=optimizer, data_loader=loader,
                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                poisson_sampling=dp.poisson_sampling, grad_sample_mode=dp.grad_sample_mode, noise_generator=rng,
            )
        if dp.vetted_noise:
            from fl_ser.privacy.noise import with_vetted_noise

            optimizer = with_vetted_noise(optimizer)
    loss_fn = nn.CrossEntropyLoss()
    total, count, steps = 0.0, 0, 0
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(xb):
                loss = loss_fn(model(xb), yb)
                with warnings.catch_warnings():  # Opacus hooks on a first layer whose input needs no grad
                    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
                    loss.backward()
                total += float(loss.detach()) * len(xb)
                count += len(xb)
            optimizer.step()  # with DP and an empty Poisson batch this is a noise-only step, still accounted
            steps += 1
            if anchor is not None:
                with torch.no_grad():
                    for p, p0 in zip(classifier.parameters(), anchor, strict=True):
                        p.sub_(cfg.lr * cfg.proximal_mu * (p - p0))
    result = {"train_loss": total / max(count, 1), "steps": steps}
    if engine is not None:
        result["spent"] = [tuple(h) for h in engine.accountant.history]
        if hasattr(model, "_close"):
            model._close()
    classifier.eval()
    return result


@torch.no_grad()
def predict(classifier: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for ``x`` (and nothing else: no labels needed)."""
    classifier.eval()
    return torch.cat([classifier(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Predicted classes and mean cross-entropy loss."""
    logits = predict(classifier, x)
    return logits.argmax(dim=1), float(nn.functional.cross_entropy(logits, y))
