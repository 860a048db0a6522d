"""Who took part in a federated round and who was lost where: the report both aggregation paths fill in.

A round's report names the devices (by Flower node id) the strategy sampled,
those lost at each stage of the round and those whose reply was malformed
(with the server's reason), the devices whose update is in the aggregate, and
how many failures had each public cause. Causes are fixed texts: a device's
:class:`~fl_ser.protocol.PublicError` code and its text, the name of one of
Flower's own error codes, :data:`NO_REPLY` or :data:`MALFORMED`; never an
error's free text, which could carry device data. The SecAgg+ workflow
(:class:`fl_ser.flower_compat.SecAggPlus`) reports the four SecAgg+ stages;
plain aggregation (:class:`server.replies.ReplyCheck`) reports ``fit``.

Stage names (also what ``faults.stages`` names, :mod:`clients.faults`): the
SecAgg+ stages ``setup``, ``share_keys``, ``collect_masked_vectors`` and
``unmask``, ``fit`` (plain, or CKKS's encrypted update), CKKS's ``decrypt``, and ``release`` (the evaluate message that
carries the released model).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flwr.common.constant import ErrorCode

from fl_ser.protocol import PublicError

SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
STAGES = (*SECAGG_STAGES, "fit", "decrypt", "release")
UPDATE_STAGES = ("collect_masked_vectors", "fit")  # the replies that carry a device's update

NO_REPLY = "no reply"  # the device was asked and never answered (reply timeout)
MALFORMED = "malformed reply"  # the server dropped the reply: see the report's "malformed" reasons

_FLOWER_CODES = {value: name.lower().replace("_", " ") for name, value in vars(ErrorCode).items()
                 if not name.startswith("_") and isinstance(value, int)}


def error_cause(code: int) -> str:
    """The public cause of an error reply with ``code``: fl-ser's fixed text, or the name of Flower's code."""
    try:
        return f"{code} {PublicError(code).reason}"
    except ValueError:
        return f"{code} flower: {_FLOWER_CODES.get(code, 'unknown error code')}"


def failure_cause(failure) -> str:
    """The public cause of one entry of Flower's ``failures`` list: an exception wrapping a reply's ``Error``
    (``Exception(msg.error)``), another exception (named by its type), or a (proxy, result) pair whose status
    is not OK (named by the status code)."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else None
        code = getattr(error, "code", None)
        return error_cause(int(code)) if isinstance(code, int) else type(failure).__name__
    _, res = failure
    return f"status {res.status.code.name.lower()}"


@dataclass
class RoundReport:
    """One round: ``sampled``; ``dropped[stage]``, the devices lost at that stage (failed, malformed, or never
    answered); ``malformed``, the server's reason per device; ``participants``, whose update is in the aggregate
    (empty when the round produced none); ``halted_at``, the stage after which the round was abandoned (too few
    devices left), else None; ``failure_causes``, a count per public cause."""

    sampled: list[int] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    malformed: dict[int, str] = field(default_factory=dict)
    participants: list[int] = field(default_factory=list)
    halted_at: str | None = None
    failure_causes: Counter = field(default_factory=Counter)

    def lost(self, stage: str, node_id: int, cause: str) -> None:
        self.dropped.setdefault(stage, []).append(int(node_id))
        self.failure_causes[cause] += 1

    def reject(self, stage: str, node_id: int, reason: str) -> None:
        self.malformed[int(node_id)] = reason
        self.lost(stage, node_id, MALFORMED)

    def as_dict(self) -> dict:
        """A JSON-able copy."""
        return {"sampled": sorted(self.sampled), "dropped": {s: sorted(n) for s, n in self.dropped.items()},
                "malformed": dict(self.malformed), "participants": sorted(self.participants),
                "halted_at": self.halted_at, "failure_causes": dict(self.failure_causes)}
