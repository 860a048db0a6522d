"""The one place fl-ser draws differential-privacy noise itself: OpenDP's Gaussian mechanism on its CSPRNG.

Why not numpy or torch: their generators (PCG64, Mersenne Twister, Philox) are
not cryptographic, and a floating-point Gaussian sampler leaks through the set
of floats it can return (Mironov 2012, "On significance of the least
significant bits for differential privacy"): an output's low bits can give the
input away.

What this module does instead, end to end inside OpenDP (``opendp==0.16``).
:func:`add_gaussian` passes the values themselves, as one float64 vector, to
OpenDP's float Gaussian mechanism with its noise granularity ``2^k`` set
explicitly::

    make_gaussian(vector_domain(atom_domain(T=float, nan=False), size=d), l2_distance(T=float), scale=std, k=k)

OpenDP rounds each input value to the nearest multiple of ``2^k`` in exact
rational arithmetic, adds ``2^k * Z`` with ``Z`` drawn from the discrete
Gaussian of scale ``std / 2^k`` on the integers (the exact sampler of Canonne,
Kamath and Steinke 2020, every random bit from OpenSSL's CSPRNG, statically
linked into the wheel; it fails with an error when no entropy is available),
and rounds the sum to the nearest float64: exact below ``2^53 * 2^k`` (at least
2^12 std), beyond that a fixed rounding of a grid value, i.e. post-processing.
The outputs lie on the grid ``2^k * integers`` whatever the input's low bits,
so the channel Mironov's attack reads is closed. fl-ser does no rounding of its
own: the grid is OpenDP's ``k`` argument. :func:`gaussian` is the same
mechanism applied to zeros, i.e. pure noise ``2^k * Z``. To release a value,
use :func:`add_gaussian`, not ``value + gaussian(...)``: grid noise added to an
unrounded float reopens the low-bit channel (``output - noise`` is then the
exact input, and the output's offset from the grid is the input's).

The grid step, :func:`grid_step`, is the power of two in ``(std / 2^41, std /
2^40]``. Its precision cost: the input rounding, at most ``step / 2 <= std *
2^-41`` (~5e-13 std) per value, and the noise's shape: the discrete Gaussian of
scale ``sigma = std / step >= 2^40`` has variance ``sigma^2`` up to a relative
error exponentially small in ``sigma^2`` (CKS 2020), so the noise has std
``std`` to float precision. It costs nothing in speed: OpenDP's time per value
is about the same for k from -60 to -10, and 4x less than at its default k.

Privacy. The discrete Gaussian satisfies the same zCDP as the continuous one,
rho = Delta^2 / (2 sigma^2), for vectors too (CKS 2020); the input rounding
raises the L2 sensitivity by at most ``step * sqrt(d)`` (below 1e-9 std for
d <= 10^6). So Gaussian accounting holds unchanged where nothing is
subsampled: a full-batch DP-GD step (sampling rate 1, fl-ser's default), or
user-level noise with every device sampled. The sum of n devices' shares
(distributed user-level noise) is a sum of discrete Gaussians on one grid: as
private as a single discrete Gaussian of the summed variance up to
``tau = 10 * sum_{k<n} exp(-2 pi^2 sigma^2 k / (k + 1))`` (Kairouz, Liu and
Steinke 2021, on sums of discrete Gaussians), zero in double precision at
sigma = 2^40. Not proved here: subsampled bounds (Opacus's RDP/PRV for Poisson
batches, q < 1; fl-ser's user-level accountant at q = m/N < 1) are derived for
the continuous Gaussian; at 2^40 grid points per std no test tells the two
apart, but that is not a proof.

OpenDP features. ``make_gaussian`` requires ``contrib``, OpenDP's label for
constructors whose proofs (this one's: docs.opendp.org/en/v0.16.0/proofs/rust/
src/measurements/noise/distribution/gaussian/make_gaussian.pdf) have not yet
completed OpenDP's vetting process. It is the only feature this module enables
(process-wide, on first use). Not enabled: ``idealized-numerics`` (formerly
``floating-point``: constructors whose guarantees assume exact real arithmetic,
the weakness avoided here) and ``honest-but-curious`` (guarantees that hold
only if the caller's arguments are truthful). Only the mechanism's sampling is
used: fl-ser keeps its own accountants and never calls OpenDP's privacy map.

Cost: 11-13 us per value on one core of this machine when it is quiet (strace
counts ~15 getpid calls per value: OpenSSL's generator is called that often),
against ~0.03 us for numpy; building the mechanism adds ~0.3 ms, so it is
cached per size and std. Figures: ``experiments/bench/noise.py``. OpenDP's
float domain does not check the input when the mechanism is invoked (a NaN came
back as noise around 0), so this module refuses non-finite values itself.

Opacus: :func:`with_vetted_noise` rebuilds the ``DPOptimizer`` that
``PrivacyEngine.make_private`` returns so that its ``add_noise`` releases each
step's summed clipped gradients through :func:`add_gaussian` (Opacus's own
``secure_mode`` needs torchcsprng, unreleased since 2021 and built for torch
1.8). OpenDP, torch and Opacus are imported on first use: a ClientApp process
that only relays SecAgg+ messages pays for none of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

#: The grid is 2^GRID_BITS (to 2^(GRID_BITS + 1)) times finer than the noise's std.
GRID_BITS = 40
_MIN_K = -1074  # OpenDP's finest granularity for float64 (the smallest subnormal)


def _check_std(std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    return std


def grid_step(std: float) -> float:
    """The grid noise of this std lies on: the power of two ``2^k`` in ``(std / 2^41, std / 2^40]``."""
    std = _check_std(std)
    if std == 0:
        raise ValueError("noise of std 0 has no grid (it is exactly zero)")
    return math.ldexp(1.0, _granularity(std))


def _granularity(std: float) -> int:
    k = math.frexp(std)[1] - 1 - GRID_BITS  # frexp: std = m * 2^e with m in [0.5, 1), so floor(log2 std) = e - 1
    if k < _MIN_K:
        raise ValueError(f"noise std {std} is too small for a float64 grid {2**GRID_BITS} times finer; "
                         "use std 0 for no noise")
    return k


#: With a caller's grid (:func:`add_gaussian`'s ``step``), the noise must span at least this many grid steps per
#: std: then the Kairouz-Liu-Steinke tau of a sum of such shares is below exp(-600), zero in double precision.
MIN_STEPS_PER_STD = 8


def _step_granularity(std: float, step: float) -> int:
    """``k`` with ``2^k == step``, refusing a step that is not a power of two or too coarse for ``std``."""
    mantissa, exponent = math.frexp(float(step))
    if not (math.isfinite(step) and step > 0 and mantissa == 0.5):
        raise ValueError(f"noise grid step {step} must be a power of two (the grid SecAgg+ quantises to)")
    if std < MIN_STEPS_PER_STD * step:
        raise ValueError(f"noise std {std:.6g} spans fewer than {MIN_STEPS_PER_STD} grid steps of {step:.6g}: the "
                         "discrete Gaussian would be too coarse for its accounting; use a finer grid")
    return exponent - 1


@functools.lru_cache(maxsize=64)
def _mechanism(size: int, std: float, k: int):
    """OpenDP's Gaussian mechanism on float64 vectors of ``size``, grid ``2^k``, built once each (~0.15 ms)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size),
                              dp.l2_distance(T=float), scale=std, k=k)


def add_gaussian(arrays: Sequence[np.ndarray], std: float, step: float | None = None) -> list[np.ndarray]:
    """``arrays`` released with N(0, std^2) noise on every value, through OpenDP (see the module docstring).

    One OpenDP call for all arrays together. Shapes and (floating) dtypes are kept: the noisy float64 values
    are cast back to each array's dtype, which is post-processing. ``std == 0`` returns copies.

    ``step`` (a power of two, at least :data:`MIN_STEPS_PER_STD` times finer than ``std``) replaces the default
    grid: OpenDP then rounds the values to multiples of ``step`` and adds ``step`` times a discrete Gaussian,
    so every output is an exact multiple of ``step`` (:mod:`fl_ser.privacy.distributed` makes it SecAgg+'s
    quantisation grid). The rounding raises the L2 sensitivity by at most ``step * sqrt(d)``.
    """
    std = _check_std(std)
    k = None if step is None or std == 0 else _step_granularity(std, step)
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"noise is added to floating-point arrays, got dtype {a.dtype}; cast it to a float first")
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64) if arrays else np.zeros(0)
    if not np.isfinite(flat).all():
        raise ValueError(f"{int((~np.isfinite(flat)).sum())} of {flat.size} values to noise are NaN or infinite "
                         "(did training diverge?); a DP release needs finite values")
    if std == 0 or flat.size == 0:
        return [a.copy() for a in arrays]
    noisy = np.asarray(_mechanism(flat.size, std, _granularity(std) if k is None else k)(flat), dtype=np.float64)
    bounds = np.cumsum([a.size for a in arrays])[:-1]
    return [part.reshape(a.shape).astype(a.dtype) for part, a in zip(np.split(noisy, bounds), arrays, strict=True)]


def gaussian(std: float, shape: int | Sequence[int]) -> np.ndarray:
    """Pure N(0, std^2) noise of ``shape`` as float64, on the grid :func:`grid_step` (zeros for ``std == 0``).

    To release a value, prefer ``add_gaussian([value], std)``: it rounds the value to the grid first.
    """
    return add_gaussian([np.zeros(shape, dtype=np.float64)], std)[0]


@functools.cache
def _vetted_optimizer_class():
    import torch
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class VettedNoiseDPOptimizer(DPOptimizer):
        """Opacus's ``DPOptimizer`` whose Gaussian noise is drawn by :func:`add_gaussian`; nothing else changes.

        Like Opacus's ``add_noise``: ``p.grad = summed clipped gradient + N(0, (z C)^2)`` for every parameter,
        with Opacus's checks that each summed gradient is noised once; here all parameters go to OpenDP in one
        call, and the float64 result is cast back to the parameter's dtype.
        """

        def add_noise(self):
            for p in self.params:
                _check_processed_flag(p.summed_grad)
            summed = [p.summed_grad for p in self.params]
            noisy = add_gaussian([s.detach().cpu().numpy() for s in summed],
                                 self.noise_multiplier * self.max_grad_norm)
            for p, s, n in zip(self.params, summed, noisy, strict=True):
                p.grad = torch.from_numpy(n).to(s.device).view_as(p)
                _mark_as_processed(p.summed_grad)

    return VettedNoiseDPOptimizer


def with_vetted_noise(optimizer):
    """The ``DPOptimizer`` that ``PrivacyEngine.make_private`` returned, rebuilt to draw its noise from OpenDP.

    Same wrapped optimizer, noise multiplier, clipping norm, expected batch size, loss reduction and
    accountant hook; call it right after ``make_private`` and use the returned optimizer instead. Only
    Opacus's plain ``DPOptimizer`` (flat clipping, one process: what fl-ser's trainer builds) is supported.
    """
    from opacus.optimizers import DPOptimizer

    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"with_vetted_noise supports Opacus's plain DPOptimizer, got {type(optimizer).__name__}; "
                        "make_private builds it with clipping='flat', grad_sample_mode 'hooks', 'functorch' or 'ew' "
                        "and a module not wrapped for distributed training")
    vetted = _vetted_optimizer_class()(
        optimizer.original_optimizer, noise_multiplier=optimizer.noise_multiplier,
        max_grad_norm=optimizer.max_grad_norm, expected_batch_size=optimizer.expected_batch_size,
        loss_reduction=optimizer.loss_reduction)
    vetted.attach_step_hook(optimizer.step_hook)
    return vetted
