"""Names both sides of a federation share: message keys, the SecAgg+ mask scheme, and the public error codes.

A leaf module (standard library only): the ClientApp, the ServerApp and the
benchmarks import it, and it imports nothing of theirs. A device and a server
that disagree on anything here cannot work together, so everything they must
agree on is written down once, here.
"""

from __future__ import annotations

from enum import IntEnum

#: Fit-config keys the server sends each round.
KEY_SERVER_ROUND = "server_round"
KEY_CLIPPING_NORM = "clipping_norm"  # Flower's own key (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM)
KEY_DEVICE_NOISE_STD = "fl-ser.device_noise_std"  # the std of this device's share of user-level noise
KEY_PROXIMAL_MU = "proximal_mu"  # FedProx (flwr.server.strategy.FedProx sends it)

#: Fit-metric keys of a device's sample-level epsilons: lifetime total, this run's share, the parts, and the lifetime
#: total against anyone who sees this device's own update (differs from the total only under distributed DP).
EPSILON_METRICS = ("epsilon", "epsilon_run", "epsilon_normalization", "epsilon_training", "epsilon_local")

#: Evaluate-config keys of the release message (server/release.py sends them after the last round).
RELEASE_ARTIFACT = "fl-ser.release.artifact"
RELEASE_ROUND = "fl-ser.release.round"
RELEASE_CONFIG_HASH = "fl-ser.release.config_hash"
RELEASE_REPORT = "fl-ser.release.report"  # False: store the release, send no metrics back

#: SecAgg+ setup-stage key: the mask expansion both sides use. The server announces it in the setup
#: message and every device echoes it in its setup reply; a mismatch on either side stops at setup.
MASK_SCHEME_KEY = "fl-ser.mask_scheme"
MASK_SCHEME = "hkdf-sha256+chacha20/v1"


class PublicError(IntEnum):
    """The only error codes a device sends, each with a fixed text (never text built from local data).

    Flower's own codes are 0-8 (``flwr.common.constant.ErrorCode``); fl-ser's start at 100.
    """

    BUDGET_SPENT = 101
    POLICY_REFUSED = 102
    INCOMPATIBLE_PROTOCOL = 103
    LEDGER_UNAVAILABLE = 104
    DEVICE_FAILED = 110
    BOUNDARY_REFUSED = 111

    @property
    def reason(self) -> str:
        return PUBLIC_REASONS[self]


PUBLIC_REASONS = {
    PublicError.BUDGET_SPENT: "device declined: its privacy budget is spent",
    PublicError.POLICY_REFUSED: "device declined: the request weakens its privacy policy",
    PublicError.INCOMPATIBLE_PROTOCOL: "device declined: incompatible secure aggregation (mask scheme)",
    PublicError.LEDGER_UNAVAILABLE: "device declined: its privacy ledger is unavailable; see its local log",
    PublicError.DEVICE_FAILED: "device failed: see its local log",
    PublicError.BOUNDARY_REFUSED: "device refused: the reply is outside its privacy boundary",
}
