"""Why a device deliberately sends nothing: refusals with a fixed public code, full details kept local.

Device code raises one of these when it decides not to answer (its budget is
spent, the server asked for weaker privacy than its policy allows, the server's
secure-aggregation scheme is not its own, its ledger cannot be trusted). The
exception's own message is for the device's local log and may name local
files or values; only :attr:`DeviceRefusal.public` (a
:class:`~fl_ser.protocol.PublicError`) ever leaves the device, through the
privacy boundary (:mod:`fl_ser.privacy.boundary`).
"""

from __future__ import annotations

from fl_ser.protocol import PublicError


class DeviceRefusal(Exception):
    """A deliberate refusal; ``str(self)`` is the local explanation, ``public`` the code that may leave."""

    public: PublicError = PublicError.DEVICE_FAILED


class BudgetSpent(DeviceRefusal):
    public = PublicError.BUDGET_SPENT


class PolicyRefused(DeviceRefusal):
    """The server's request is weaker than the device's own privacy policy allows."""

    public = PublicError.POLICY_REFUSED


class IncompatibleProtocol(DeviceRefusal):
    """The server runs a secure-aggregation scheme other than the device's (e.g. stock Flower's masks)."""

    public = PublicError.INCOMPATIBLE_PROTOCOL


class LedgerUnavailable(DeviceRefusal):
    """The device's privacy ledger is corrupt, missing where it should exist, or held by another run."""

    public = PublicError.LEDGER_UNAVAILABLE
