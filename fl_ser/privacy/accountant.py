"""Privacy accounting with Opacus's accountants (RDP by default, PRV available) of the sampled Gaussian mechanism.

Two guarantees are accounted:

* **Sample level, per device**: every mechanism a device applies to its
  utterances is an entry ``(noise_multiplier, sample_rate, steps)``: a DP-SGD
  round is ``(z, batch / n, steps)`` (Poisson-subsampled Gaussian), a
  normaliser release ``(z, 1, 1)`` (the plain Gaussian mechanism). Entries
  compose across rounds and runs; the device's lifetime list lives in its
  on-disk ledger (:mod:`fl_ser.privacy.ledger`). :func:`epsilon` turns a list
  of entries into epsilon at delta.
* **User level, per federation** (:func:`user_level_epsilon`): each round the
  server samples devices at rate q = m / N, adds Gaussian noise of std
  z * C / m to the mean of updates clipped to L2 norm C; R rounds compose.

Both use add/remove-one adjacency (Opacus's), of one utterance and of one
device's whole data respectively.

**Set epsilon, not noise** (:func:`calibrated_noise`): given a target epsilon
and the plan of what will be spent as a function of the noise multiplier z
(the normaliser's release, the planned rounds and steps), the smallest z whose
composed epsilon does not exceed the target, found by bisection on the same
accountant that later reports the spend, as Opacus's
``get_noise_multiplier``/``make_private_with_epsilon`` do for a single
mechanism. The result meets the target from below, within
:data:`CALIBRATION_RTOL` of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps): Opacus's accountant history
#: :func:`calibrated_noise` stops once the planned epsilon is within this fraction below the target.
CALIBRATION_RTOL = 0.01


class PrivacyBudgetError(ValueError):
    """A privacy configuration cannot be met (impossible budget, bad delta, ...)."""


def check_delta(delta: float, num_records: int, who: str) -> None:
    """Reject deltas that make the guarantee meaningless (delta must be well below 1/n)."""
    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"{who}: delta must be in (0, 1), got {delta}.")
    if num_records > 0 and delta >= 1.0 / num_records:
        raise PrivacyBudgetError(
            f"{who}: delta={delta} is not below 1/n = 1/{num_records}; such a guarantee allows leaking one "
            f"record outright. Use a smaller delta (e.g. {10 ** math.floor(math.log10(0.1 / num_records)):g})."
        )


def merged(entries: Iterable[Entry]) -> list[Entry]:
    """The same composition with repeated mechanisms merged (steps of equal (z, q) add up), in first-seen order."""
    steps: Counter = Counter()
    for z, q, n in entries:
        steps[(float(z), float(q))] += int(n)
    return [(z, q, n) for (z, q), n in steps.items()]


def accountant(entries: Iterable[Entry], mechanism: str = "rdp") -> IAccountant:
    """A fresh Opacus accountant whose history is ``entries``."""
    acc = create_accountant(mechanism)
    acc.history = merged(entries)
    return acc


def epsilon(entries: Iterable[Entry], delta: float, mechanism: str = "rdp") -> float:
    """Epsilon at ``delta`` of composing ``entries`` (0 for none)."""
    history = merged(entries)
    return float(accountant(history, mechanism).get_epsilon(delta)) if history else 0.0


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       mechanism: str = "rdp") -> float | None:
    """User-level epsilon of DP-FedAvg after ``rounds`` rounds; None when no user-level noise is added."""
    if noise_multiplier <= 0 or rounds <= 0:
        return None
    return epsilon([(noise_multiplier, sample_rate, rounds)], delta, mechanism)


def calibrated_noise(target_epsilon: float, delta: float, plan: Callable[[float], list[Entry]],
                     mechanism: str = "rdp", who: str = "the plan") -> float:
    """The noise multiplier ``z`` for which ``plan(z)`` spends at most ``target_epsilon`` at ``delta``, and at least
    ``(1 - CALIBRATION_RTOL)`` of it; ``plan`` maps a noise multiplier to the entries that will be spent.

    Raises :class:`PrivacyBudgetError` when no noise reaches the target (what ``plan`` spends regardless of ``z``,
    e.g. a normaliser release, already exceeds it).
    """
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise PrivacyBudgetError(f"{who}: target_epsilon must be a positive number, got {target_epsilon}")

    def eps(z: float) -> float:
        return epsilon(plan(z), delta, mechanism)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 1e6:
            raise PrivacyBudgetError(
                f"{who}: target_epsilon={target} cannot be reached at delta={delta} with any noise: what is spent "
                f"regardless of the noise multiplier (e.g. the normaliser's release) already exceeds it. Raise "
                "the target, or lower privacy.normalization's spend.")
    lo = hi / 2
    while lo > 1e-3 and eps(lo) <= target:
        hi, lo = lo, lo / 2
    for _ in range(200):
        if eps(hi) >= target * (1 - CALIBRATION_RTOL):
            break
        mid = math.sqrt(lo * hi)
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi
