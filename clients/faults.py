"""Fault injection for tests and rehearsals: a ClientApp mod that loses or corrupts chosen devices' replies.

Configured by the experiment's ``faults`` block (``conf/config.yaml``; off while
``faults.drop_rate`` is 0). For each message a device receives at one of
``faults.stages`` (see :mod:`fl_ser.round_report` for the stage names), in one
of ``faults.rounds`` (any round when null), on one of ``faults.devices``
(any device when null), a fault is drawn with probability ``faults.drop_rate``:

* ``when=before``: the device crashes on receipt and does nothing;
* ``when=after``: the device does the work (and spends its privacy budget,
  recorded in its ledger) but its reply is lost;
* ``corrupt`` set (wrong_length | wrong_dtype | nan): the device does the work
  and its reply arrives with its update arrays malformed; only replies that
  carry an update (stages ``fit`` and ``collect_masked_vectors``) are corrupted.

The mod sits outside the device's privacy boundary (it stands for the network
and the process, not the device): what it corrupts has already passed the
device's own checks. A lost reply is an error reply with Flower's code for it
(``NODE_UNAVAILABLE`` when the device crashed on receipt,
``REPLY_MESSAGE_UNAVAILABLE`` when its reply was lost): Flower's simulation
always answers, and to the protocol both are a failure at that stage. Faults
are drawn from the OS's ``random.SystemRandom``, or, with ``faults.seed``, from
a generator seeded by the seed, the device, the round and the stage (the same
faults on every rerun, whichever process handles the message). Every injected
fault is logged to the device's local log.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_ser.protocol import CKKS_CIPHERTEXTS, CKKS_RECORD, CKKS_STAGE
from fl_ser.round_report import STAGES, UPDATE_STAGES

log = logging.getLogger("fl_ser.device")

WHEN = ("before", "after")
CORRUPTIONS = ("wrong_length", "wrong_dtype", "nan")
SECAGG = "secaggplus_configs"
MASKED = "masked_params"


class FaultConfigError(ValueError):
    """The ``faults`` config block cannot be used as written; the message names the setting and the fix."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject (the ``faults`` config block, checked)."""

    drop_rate: float = 0.0
    stages: tuple[str, ...] = STAGES
    when: str = "after"
    devices: frozenset[str] | None = None  # speakers or partition ids, as strings; None: any device
    rounds: frozenset[int] | None = None  # None: any round
    corrupt: str | None = None
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.drop_rate <= 1.0:
            raise FaultConfigError(f"faults.drop_rate must be a probability in [0, 1], got {self.drop_rate}")
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise FaultConfigError(f"faults.stages: unknown stages {unknown}; the stages are {list(STAGES)}")
        if self.when not in WHEN:
            raise FaultConfigError(f"faults.when must be one of {list(WHEN)}, got {self.when!r}")
        if self.corrupt is not None and self.corrupt not in CORRUPTIONS:
            raise FaultConfigError(f"faults.corrupt must be null or one of {list(CORRUPTIONS)}, got {self.corrupt!r}")
        if self.corrupt is not None and not set(self.stages) & set(UPDATE_STAGES):
            raise FaultConfigError(f"faults.corrupt={self.corrupt} malforms update replies, but faults.stages "
                                   f"{list(self.stages)} has none: add {' or '.join(UPDATE_STAGES)}")

    @classmethod
    def from_config(cls, faults) -> FaultPlan | None:
        """The plan of a ``faults`` config block, or None when it injects nothing (absent, or drop_rate 0)."""
        if faults is None or not float(faults.get("drop_rate") or 0.0):
            return None

        def optional(key, kind):
            value = faults.get(key)
            return None if value is None else frozenset(kind(v) for v in value)

        stages = faults.get("stages")
        return cls(drop_rate=float(faults.drop_rate), stages=tuple(STAGES if stages is None else map(str, stages)),
                   when=str(faults.get("when", "after")), devices=optional("devices", str),
                   rounds=optional("rounds", int), corrupt=faults.get("corrupt"),
                   seed=None if faults.get("seed") is None else int(faults.seed))

    def strikes(self, names: set[str], server_round: int | None, stage: str) -> bool:
        """Whether the message of ``stage`` and ``server_round`` to the device called ``names`` gets a fault."""
        if stage not in self.stages or (self.corrupt is not None and stage not in UPDATE_STAGES):
            return False
        if self.devices is not None and not names & self.devices:
            return False
        if self.rounds is not None and server_round not in self.rounds:
            return False
        if self.seed is None:
            return random.SystemRandom().random() < self.drop_rate
        device = "/".join(sorted(names))
        return random.Random(f"{self.seed}|{device}|{server_round}|{stage}").random() < self.drop_rate


def stage_of(msg) -> str | None:
    """The message's stage: a SecAgg+ stage, ``fit``, CKKS's ``decrypt``, ``release``, or None (nothing faults
    target)."""
    from flwr.app.message_type import MessageType

    from fl_ser.protocol import RELEASE_ARTIFACT

    kind = msg.metadata.message_type
    if kind == MessageType.TRAIN:
        configs = msg.content.config_records.get(SECAGG)
        if configs is None and CKKS_RECORD in msg.content.config_records:  # aggregation=ckks: fit or decrypt
            return str(msg.content.config_records[CKKS_RECORD].get(CKKS_STAGE))
        return "fit" if configs is None else str(configs.get("stage"))
    if kind == MessageType.EVALUATE and RELEASE_ARTIFACT in msg.content.config_records.get("evaluateins.config", {}):
        return "release"
    return None


def corrupted(arrays: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """``arrays`` malformed as ``kind`` says: the last one a value short, in another dtype (float to float16,
    integers to float64), or with a NaN."""
    arrays = [np.array(a) for a in arrays]
    if kind == "wrong_length":
        arrays[-1] = arrays[-1].reshape(-1)[:-1]
    elif kind == "wrong_dtype":
        arrays = [a.astype(np.float16 if a.dtype.kind == "f" else np.float64) for a in arrays]
    else:
        arrays[-1] = arrays[-1].astype(np.float64)
        arrays[-1].reshape(-1)[0] = np.nan
    return arrays


def corrupt_reply(reply, stage: str, kind: str) -> None:
    """Malform the update a fit reply (``fit``; under CKKS its ciphertexts) or a masked-vector reply
    (``collect_masked_vectors``) carries."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    if stage == "collect_masked_vectors":
        configs = reply.content.config_records[SECAGG]
        configs[MASKED] = [ndarray_to_bytes(a) for a in corrupted([bytes_to_ndarray(b) for b in configs[MASKED]],
                                                                   kind)]
        return
    if CKKS_RECORD in reply.content.config_records:  # an encrypted update: its ciphertexts arrive damaged
        configs = reply.content.config_records[CKKS_RECORD]
        configs[CKKS_CIPHERTEXTS] = [b[:len(b) // 2] for b in configs[CKKS_CIPHERTEXTS]]
        return
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    fitres.parameters = ndarrays_to_parameters(corrupted(parameters_to_ndarrays(fitres.parameters), kind))
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)


def lost_reply(msg, when: str):
    """The error reply the server gets for a device that crashed on receipt (before) or whose reply was lost."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    if when == "before":
        error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable - the device crashed on "
                                                              "receipt (injected fault)")
    else:
        error = Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason="Error: Reply Message Unavailable - the "
                                                                       "reply was lost (injected fault)")
    return Message(error, reply_to=msg)


def node_names(context) -> set[str]:
    """What ``faults.devices`` may call a node: its partition id and its speaker, from its node config (else its
    node id)."""
    names = {str(context.node_config[k]) for k in ("partition-id", "speaker") if k in context.node_config}
    return names or {str(context.node_id)}


def make_fault_mod(plan_of: Callable, device_of: Callable | None = None):
    """The fault-injection mod. ``plan_of(context)``: the :class:`FaultPlan` for this message (None: no faults);
    ``device_of(context)``: (the names ``faults.devices`` may call the device, its local log or None); default:
    :func:`node_names` and no log."""

    def fault_mod(msg, ctxt, call_next):
        stage = stage_of(msg)
        if stage is None:
            return call_next(msg, ctxt)
        try:
            plan = plan_of(ctxt)
            names, log_path = device_of(ctxt) if device_of is not None else (node_names(ctxt), None)
        except FaultConfigError:
            raise
        except Exception:  # a misconfigured node: the device reports it itself, from inside its boundary
            return call_next(msg, ctxt)
        group = msg.metadata.group_id
        server_round = int(group) if group.isdigit() else None
        if plan is None or not plan.strikes(names, server_round, stage):
            return call_next(msg, ctxt)
        device = "/".join(sorted(names))
        if plan.when == "before" and plan.corrupt is None:
            _note(log_path, "fault injected (faults.when=before): device %s crashed on receipt of its %s message "
                  "(round %s); it did nothing", device, stage, server_round)
            return lost_reply(msg, "before")
        reply = call_next(msg, ctxt)
        outcome = "an error" if reply.has_error() else "its reply"
        if plan.corrupt is not None and not reply.has_error():
            corrupt_reply(reply, stage, plan.corrupt)
            _note(log_path, "fault injected (faults.corrupt=%s): device %s's %s reply (round %s) was malformed on "
                  "its way", plan.corrupt, device, stage, server_round)
            return reply
        _note(log_path, "fault injected (faults.when=after): device %s handled its %s message (round %s) and sent "
              "%s, which was lost", device, stage, server_round, outcome)
        return lost_reply(msg, "after")

    return fault_mod


def _note(log_path: Path | None, text: str, *args) -> None:
    from fl_ser.privacy.boundary import local_log

    with local_log(log_path):
        log.warning(text, *args)


def fault_mods(cfg, resolve) -> list:
    """The ClientApp's fault mods: none when ``cfg`` (simulation) injects no faults (an invalid ``faults`` block
    raises :class:`FaultConfigError` here); otherwise one, which reads the plan from ``cfg`` or, on a SuperNode
    (``cfg`` None), from each run's config. ``resolve(context)``: the experiment and the device's setup (its
    speaker and local log)."""
    if cfg is not None:
        plan = FaultPlan.from_config(cfg.get("faults"))
        if plan is None:
            return []

        def plan_of(context):
            return plan
    else:
        def plan_of(context):
            return FaultPlan.from_config(resolve(context)[0].get("faults"))

    def device_of(context):
        setup = resolve(context)[1]
        return node_names(context) | {setup.speaker}, Path(setup.log_path)

    return [make_fault_mod(plan_of, device_of)]
