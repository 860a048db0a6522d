"""Privacy accounting that composes across federated rounds.

Two guarantees are tracked, both with Opacus's accountants (RDP by default, PRV
available) of the sampled Gaussian mechanism:

* **Sample level, per device** (:class:`PrivacyLedger`): every DP-SGD step a
  device takes, in every round it takes part in, is one composition of the
  Poisson-subsampled Gaussian mechanism with rate q = batch_size / n_local and
  noise multiplier z. A fresh Opacus ``PrivacyEngine`` restarts at zero, so the
  ledger's history lives in the node's ``context.state`` between rounds and is
  handed to each round's engine.
* **User level, per federation** (:func:`user_level_epsilon`): each round the
  server samples devices at rate q = m / N, adds Gaussian noise of std
  z * C / m to the mean of updates clipped to L2 norm C; R rounds compose.
"""

from __future__ import annotations

import json
import math

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant


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


class PrivacyLedger:
    """A device's sample-level DP-SGD history, composable across rounds and serialisable."""

    def __init__(self, mechanism: str = "rdp", history: list[tuple[float, float, int]] | None = None):
        self.mechanism = mechanism
        self.history: list[tuple[float, float, int]] = [tuple(h) for h in history or []]  # type: ignore[misc]

    def _accountant(self, extra: tuple[float, float, int] | None = None) -> IAccountant:
        acc = create_accountant(self.mechanism)
        acc.history = [*self.history, *([extra] if extra else [])]
        return acc

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon over everything recorded so far (0 when nothing was)."""
        return float(self._accountant().get_epsilon(delta)) if self.history else 0.0

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """The cumulative epsilon this device would have after ``steps`` more DP-SGD steps."""
        return float(self._accountant((noise_multiplier, sample_rate, steps)).get_epsilon(delta))

    def adopt(self, accountant: IAccountant) -> None:
        """Take over the history of the accountant an Opacus engine used for this round."""
        self.history = [tuple(h) for h in accountant.history]  # type: ignore[misc]

    def make_accountant(self) -> IAccountant:
        """A fresh Opacus accountant that starts from this ledger's history."""
        return self._accountant()

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def to_json(self) -> str:
        return json.dumps({"mechanism": self.mechanism, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        return cls(data["mechanism"], [tuple(h) for h in data["history"]])


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       mechanism: str = "rdp") -> float | None:
    """User-level epsilon of DP-FedAvg after ``rounds`` rounds; None when no user-level noise is added."""
    if noise_multiplier <= 0 or rounds <= 0:
        return None
    acc = create_accountant(mechanism)
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta))
