"""Distributed sample-level DP under SecAgg+: each device adds only its share of one DP-GD step's noise.

``privacy=distributed`` (``privacy.dp_sgd.placement=distributed``) turns a round
into one step of DP-GD over the utterances of *all* the round's devices
(Kairouz, Liu and Steinke 2021, "The distributed discrete Gaussian mechanism
for federated learning with secure aggregation"):

1. each device clips every utterance's gradient at the global model to L2 norm
   ``C`` (``privacy.dp_sgd.max_grad_norm``) and sums them: ``S_j``;
2. it scales the sum by ``1 / B``, a *public* normaliser (the number of
   utterances a round is expected to sum over, like Opacus's expected batch
   size: ``privacy.distributed.expected_batch``; it sets the step size and keeps
   the sum inside SecAgg+'s range, and depends on no one's data);
3. it releases ``S_j / B`` through OpenDP's Gaussian mechanism on SecAgg+'s own
   quantisation grid ``g = 2 clipping_range / quantization_range`` (a power of
   two): OpenDP rounds each value to a multiple of ``g`` and adds ``g`` times a
   discrete Gaussian of scale ``sigma_j / g``, every bit from its CSPRNG
   (:func:`fl_ser.privacy.noise.add_gaussian` with ``step=g``);
4. it reduces the integers modulo SecAgg+'s ``quantization_range`` T and hands
   them to SecAgg+ as values on the grid inside ``[-clipping_range,
   clipping_range)`` (:meth:`SecAggGrid.encode`), which Flower's quantiser maps
   back to exactly those integers: no clipping, no stochastic rounding (exact
   when ``clipping_range`` is a power of two; :class:`SecAggGrid` refuses
   anything else);
5. the server unmasks the sum modulo T of all devices' integers
   (:meth:`SecAggGrid.decode`), i.e. ``sum_j S_j / B`` plus the summed noise,
   and takes the step ``w <- w - lr * that`` (:mod:`server.distributed_dp`);
   FedAdam's or FedAvg's server step on top is post-processing.

Sensitivity. Adding or removing one utterance of device j changes ``S_j / B``
by at most ``C / B`` in L2; OpenDP's rounding to the grid adds at most ``g
sqrt(d)`` (d parameters), so ``Delta = C / B + g sqrt(d)``
(:meth:`DistributedDPGD.sensitivity`). Each device adds discrete Gaussian noise
of std ``sigma_j = z Delta / sqrt(k)``, so any sum of at least ``k`` devices'
shares carries noise of variance at least ``(z Delta)^2``: the Gaussian
mechanism with noise multiplier ``z`` on the pooled utterances, one step a
round at sampling rate 1 (every utterance of every device), composed over
rounds by the same RDP/PRV accountant as local DP-SGD. A sum of discrete
Gaussians on one grid is as private as one discrete Gaussian of the summed
variance up to ``tau = 10 sum_{i<k} exp(-2 pi^2 (sigma_j/g)^2 i / (i+1))``
(Kairouz et al. 2021, Thm. 12); fl-ser requires ``sigma_j >= 8 g``
(:data:`fl_ser.privacy.noise.MIN_STEPS_PER_STD`), which puts tau below
exp(-600), and in practice ``sigma_j / g`` is in the thousands. Full batches
(q = 1) are deliberate: the subsampled Gaussian bounds Opacus computes are
proved for the continuous Gaussian, and fl-ser claims nothing it cannot
derive. The modular reduction is post-processing of the sum; it loses accuracy
only if a coordinate of the true sum exceeds ``clipping_range`` in magnitude,
which ``B`` makes rare (``|sum| <= C x utterances / B`` per coordinate).

Two guarantees, both in the device's ledger and reported (README "Privacy"):

* **against the aggregator** (``epsilon``): noise multiplier ``z``, under
  SecAgg+'s trust model: the server is honest-but-curious and sees only the
  unmasked sum; every sum it learns holds at least ``k`` honest devices'
  shares (:func:`contributors_bound`: SecAgg+'s reconstruction threshold,
  which Flower's unmasking needs, or ``privacy.distributed.min_contributors``
  if larger, which the server's workflow enforces by halting a round with
  fewer masked vectors before unmasking); devices do not collude with the
  server against each other;
* **against anyone who sees this device's own share** (``epsilon_local``: the
  server colluding with enough of its SecAgg+ neighbours to unmask it): noise
  multiplier ``z / sqrt(k)`` only.

The device's lifetime budget is checked against the first, as its policy
accepts distributed noise only with a cohort at least its ``min_cohort``
(:mod:`fl_ser.privacy.policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fl_ser.privacy.accountant import Entry


@dataclass(frozen=True)
class SecAggGrid:
    """SecAgg+'s quantisation: values in ``[-clipping_range, clipping_range]`` mapped to integers in ``[0, T]``."""

    clipping_range: float
    quantization_range: int  # T

    @staticmethod
    def is_exact(clipping_range: float, quantization_range: int) -> bool:
        """Both powers of two: then Flower's quantiser maps every grid value to its integer exactly."""
        t = int(quantization_range)
        return clipping_range > 0 and math.frexp(float(clipping_range))[0] == 0.5 and t >= 2 and not t & (t - 1)

    def __post_init__(self):
        if not self.is_exact(self.clipping_range, self.quantization_range):
            from fl_ser.privacy.accountant import PrivacyBudgetError

            raise PrivacyBudgetError(
                f"distributed DP needs SecAgg+'s clipping_range and quantization_range to be powers of two (got "
                f"{self.clipping_range} and {self.quantization_range}): only then do the noisy integers pass "
                "Flower's quantiser exactly. Set aggregation.clipping_range to a power of two, e.g. 8.")

    @property
    def step(self) -> float:
        """The grid ``g``: one integer step of SecAgg+'s quantiser."""
        return 2 * float(self.clipping_range) / int(self.quantization_range)

    def on_grid(self, values: np.ndarray) -> bool:
        """Every value an exact multiple of :attr:`step`."""
        k = np.asarray(values, dtype=np.float64) / self.step
        return bool(np.array_equal(k, np.round(k)))

    def holds(self, arrays) -> bool:
        """Every value on the grid inside ``[-clipping_range, clipping_range)``: an encoded share, which Flower's
        ``quantize`` neither clips nor rounds."""
        cr = float(self.clipping_range)
        return all(self.on_grid(a) and np.min(a) >= -cr and np.max(a) < cr for a in map(np.asarray, arrays) if a.size)

    def encode(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """Grid values (exact multiples of :attr:`step`) as SecAgg+ inputs: their integers modulo T, written as
        ``step * K - clipping_range`` with ``K`` in ``[0, T)``, which Flower's quantiser turns back into ``K``."""
        out = []
        for v in values:
            k = np.asarray(v, dtype=np.float64) / self.step
            if not self.on_grid(v):
                raise ValueError("distributed share is not on SecAgg+'s grid; it must come from add_gaussian(step=)")
            residue = np.mod(k.astype(np.int64), int(self.quantization_range))
            out.append(residue.astype(np.float64) * self.step - float(self.clipping_range))
        return out

    def decode(self, mean: list[np.ndarray], contributors: int) -> list[np.ndarray]:
        """The sum of ``contributors`` encoded shares from Flower's SecAgg+ result (their mean after dequantising),
        as centred values: the integer sum modulo T, in ``[-T/2, T/2)``, times :attr:`step`."""
        t = int(self.quantization_range)
        out = []
        for m in mean:
            total = np.round(contributors * (np.asarray(m, dtype=np.float64) + float(self.clipping_range))
                             / self.step).astype(np.int64)
            centred = np.mod(total + t // 2, t) - t // 2
            out.append(centred.astype(np.float64) * self.step)
        return out


#: ``min_contributors: auto`` tolerates this fraction of a round's devices dropping out (rounded down).
DROPOUT_TOLERANCE = 0.1


def contributors_bound(configured, threshold: int, cohort: int | None) -> int:
    """k, the fewest devices' shares in any sum the server learns: never below SecAgg+'s reconstruction threshold
    t (Flower's unmasking needs t survivors' key shares, each of whom sent a masked vector); ``configured`` may
    raise it, which the server's workflow enforces before unmasking (:class:`fl_ser.flower_compat.SecAggPlus`):
    a number, or ``auto``: the round's ``cohort`` less :data:`DROPOUT_TOLERANCE` of it (t where the cohort is
    unknown). Null: t."""
    if configured is None:
        return int(threshold)
    if str(configured) == "auto":
        least = cohort - math.floor(DROPOUT_TOLERANCE * cohort) if cohort else 0
    else:
        least = int(configured)
    return max(int(threshold), least)


@dataclass(frozen=True)
class DistributedDPGD:
    """One experiment's distributed DP-GD: noise multiplier of the sum, clipping, normaliser and contributors."""

    noise_multiplier: float  # z, against the aggregator
    max_grad_norm: float  # C, per utterance
    expected_batch: float  # B, public
    min_contributors: int  # k

    def __post_init__(self):
        from fl_ser.privacy.accountant import PrivacyBudgetError

        if not self.noise_multiplier > 0:
            raise PrivacyBudgetError(f"distributed DP needs a positive noise multiplier, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0 or not self.expected_batch > 0:
            raise PrivacyBudgetError("distributed DP needs positive privacy.dp_sgd.max_grad_norm and "
                                     "privacy.distributed.expected_batch")
        if self.min_contributors < 2:
            raise PrivacyBudgetError(f"privacy.distributed.min_contributors must be at least 2 (a sum of one device's "
                                     f"share is its share), got {self.min_contributors}")

    @property
    def local_noise_multiplier(self) -> float:
        """What one device's share alone carries: ``z / sqrt(k)``."""
        return self.noise_multiplier / math.sqrt(self.min_contributors)

    def round_entries(self) -> list[Entry]:
        """One round against the aggregator: the Gaussian mechanism on all utterances, sampling rate 1, 1 step."""
        return [(self.noise_multiplier, 1.0, 1)]

    def local_round_entries(self) -> list[Entry]:
        return [(self.local_noise_multiplier, 1.0, 1)]

    def sensitivity(self, num_params: int, step: float) -> float:
        """L2 sensitivity of a device's scaled sum to one utterance, OpenDP's rounding to the grid included."""
        return self.max_grad_norm / self.expected_batch + step * math.sqrt(num_params)

    def share_std(self, num_params: int, step: float) -> float:
        """The std of the device's own share: any ``k`` shares together have std ``z x sensitivity``."""
        return self.noise_multiplier * self.sensitivity(num_params, step) / math.sqrt(self.min_contributors)


def clipped_gradient_sum(classifier, x, y, max_grad_norm: float, chunk: int = 128) -> list[np.ndarray]:
    """``sum_u clip(grad loss(u), C)`` at the classifier's weights: per-utterance gradients (torch.func), each
    clipped to L2 norm ``C`` over all parameters, summed in float64. Dropout is off (eval mode): the step is one
    deterministic function of the data, noised once."""
    import torch
    from torch.func import functional_call, grad, vmap

    classifier.eval()
    params = {k: v.detach() for k, v in classifier.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(classifier, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for i in range(0, len(x), chunk):
        g = per_sample(params, x[i:i + chunk], y[i:i + chunk])
        norms = torch.sqrt(sum(v.flatten(1).to(torch.float64).pow(2).sum(1) for v in g.values()))
        scale = (max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        for k, v in g.items():
            total[k] += (v.to(torch.float64) * scale.view(-1, *[1] * (v.dim() - 1))).sum(0)
    return [total[k].numpy() for k, _ in classifier.named_parameters()]


def device_share(classifier, x, y, settings: DistributedDPGD, grid: SecAggGrid) -> list[np.ndarray]:
    """This device's SecAgg+ input for one round: ``S_j / B`` through OpenDP's Gaussian mechanism on the grid, of
    std :meth:`DistributedDPGD.share_std`, encoded for Flower's quantiser. The caller records the spend first."""
    from fl_ser.privacy.noise import add_gaussian

    summed = clipped_gradient_sum(classifier, x, y, settings.max_grad_norm)
    num_params = sum(a.size for a in summed)
    std = settings.share_std(num_params, grid.step)
    noisy = add_gaussian([a / settings.expected_batch for a in summed], std, step=grid.step)
    return grid.encode(noisy)


def noise_share(shapes: list[tuple[int, ...]], settings: DistributedDPGD, grid: SecAggGrid) -> list[np.ndarray]:
    """A share of pure noise (a declining device's): the same std on zeros, which depends on no data."""
    from fl_ser.privacy.noise import add_gaussian

    zeros = [np.zeros(s, dtype=np.float64) for s in shapes]
    std = settings.share_std(sum(z.size for z in zeros), grid.step)
    return grid.encode(add_gaussian(zeros, std, step=grid.step))
