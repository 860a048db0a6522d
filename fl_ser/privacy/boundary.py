"""The device's privacy boundary: the complete list of what may leave a device, enforced on every reply, errors too.

Every message a device answers passes :func:`guard`, the outermost layer of the
ClientApp. It runs the device's handling of the message and then checks the
reply against the table below, by name *and* by value; anything not listed
is not sent. Raw audio, features, labels, normaliser statistics, the ledger
and the device's logs are not in the table, so they can never leave. With
secure aggregation on, no float array leaves either: the model update leaves
only as SecAgg+-masked integers or CKKS ciphertexts, and the server learns
only their sum.

Errors cross the same boundary. Whatever goes wrong on the device (a refusal,
an unreadable file, a corrupt cache, a bug) is written in full to the device's
*local* log, and the reply carries only a fixed :class:`~fl_ser.protocol.PublicError`
code and its fixed text: never an exception's message, which can name files,
utterance ids, labels or values. Flower would otherwise send that message to
the server (``str(exception)`` in ``run_clientapp`` and in the simulation's
``vce_api``).

What leaves, by reply (``R`` = record name, then the keys allowed in it):

=====================  ===========================================================
SecAgg+ setup          ``secaggplus_configs``: ``pk1``, ``pk2`` (public keys), the mask scheme
SecAgg+ share keys     ``secaggplus_configs``: ``dsts``, ``ctxts`` (encrypted key shares)
SecAgg+ masked vector  ``secaggplus_configs``: ``masked_params`` (masked, quantised update:
                       integer arrays of exactly the model's size plus the weight factor);
                       ``fitres.metrics``: TRAIN_METRICS; ``fitres.num_examples``
                       (1 for every device when updates are clipped); ``fitres.status``;
                       ``fitres.parameters`` present but empty
SecAgg+ unmask         ``secaggplus_configs``: ``nids``, ``shares`` (key shares of neighbours)
CKKS fit               ``fl-ser.ckks``: ``ciphertexts`` (the weighted update and its weight, CKKS-
                       encrypted: bytes only), ``key_id`` (16 hex digits, the key's public name);
                       ``fitres.*`` as for the SecAgg+ masked vector (num_examples 1)
CKKS decrypt           ``fl-ser.ckks``: ``sum`` (a round's sum of at least the device's minimum of
                       updates, rounded to the public grid: finite float64 values)
train, plain           ``fitres.parameters`` (the clipped update, float arrays of the model's
                       shapes, visible to the server: only with ``aggregation=plain``); the same
                       metrics as above
evaluate (release)     ``evaluateres.loss``, ``evaluateres.num_examples``,
                       ``evaluateres.metrics``: EVALUATE_METRICS; ``evaluateres.status``
error                  a :class:`~fl_ser.protocol.PublicError` code and its fixed text
=====================  ===========================================================

TRAIN_METRICS are the device's epsilons (lifetime total, this run's, and the
normalisation and training parts, each a finite number) and whether it
declined for lack of budget. They are functions of public hyper-parameters
and of the device's participation, except that with Poisson batches the
sampling rate ``batch / n`` ties epsilon to the device's number of
utterances. EVALUATE_METRICS are the device's accuracy with the released
model: aggregate statistics of its data that are *not* covered by DP; the
device's policy (``device_report``) or ``release.device_report=false`` turns
them off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fl_ser.privacy.refusals import DeviceRefusal
from fl_ser.protocol import (
    CKKS_CIPHERTEXTS,
    CKKS_DECRYPT,
    CKKS_FIT,
    CKKS_KEY_ID,
    CKKS_RECORD,
    CKKS_STAGE,
    CKKS_SUM,
    EPSILON_METRICS,
    MASK_SCHEME_KEY,
    PublicError,
)

TRAIN_METRICS = frozenset({*EPSILON_METRICS, "declined"})
EVALUATE_METRICS = frozenset({"uar", "accuracy", "num_utterances", "epsilon"})

SECAGG = "secaggplus_configs"
SECAGG_STAGE_KEYS = {
    "setup": frozenset({"pk1", "pk2", MASK_SCHEME_KEY}),
    "share_keys": frozenset({"dsts", "ctxts"}),
    "collect_masked_vectors": frozenset({"masked_params"}),
    "unmask": frozenset({"nids", "shares"}),
}
#: The boundary's names of the CKKS stages (``ckks_`` + the stage the request's CKKS record names).
CKKS_STAGE_KEYS = {f"ckks_{CKKS_FIT}": frozenset({CKKS_CIPHERTEXTS, CKKS_KEY_ID}),
                   f"ckks_{CKKS_DECRYPT}": frozenset({CKKS_SUM})}
STATUS_MESSAGES = frozenset({"Success", ""})  # what Flower's NumPyClient writes; no other text leaves
FIT_RECORDS = {"fitres.metrics": TRAIN_METRICS, "fitres.num_examples": frozenset({"num_examples"}),
               "fitres.status": frozenset({"code", "message"})}
EVALUATE_RECORDS = {"evaluateres.loss": frozenset({"loss"}), "evaluateres.num_examples": frozenset({"num_examples"}),
                    "evaluateres.metrics": EVALUATE_METRICS, "evaluateres.status": frozenset({"code", "message"})}

log = logging.getLogger("fl_ser.device")


class PrivacyBoundaryError(RuntimeError):
    """A device was about to send something the privacy boundary does not list."""


def describe(content) -> dict:
    """A JSON-able description of a RecordDict: every record, its keys and array shapes/dtypes (no values)."""
    out: dict = {}
    for name, rec in content.array_records.items():
        out[name] = {"kind": "arrays", "items": {k: {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)}
                                                 for k, a in rec.items()}}
    for name, rec in content.config_records.items():
        out[name] = {"kind": "config", "keys": sorted(rec.keys())}
    for name, rec in content.metric_records.items():
        out[name] = {"kind": "metrics", "keys": sorted(rec.keys())}
    return out


def allowed_records(message_type: str, stage: str | None, secure_aggregation: bool) -> dict[str, frozenset | str]:
    """The records a reply may carry: name -> allowed keys, or "empty-arrays" / "arrays"."""
    if message_type == "train" and secure_aggregation:
        if stage in CKKS_STAGE_KEYS:
            allowed: dict[str, frozenset | str] = {CKKS_RECORD: CKKS_STAGE_KEYS[stage]}
        elif stage in SECAGG_STAGE_KEYS:
            allowed = {SECAGG: SECAGG_STAGE_KEYS[stage]}
        else:
            raise PrivacyBoundaryError(f"train reply outside the secure aggregation protocols (stage {stage!r}) is "
                                       "not allowed")
        if stage in ("collect_masked_vectors", f"ckks_{CKKS_FIT}"):
            allowed.update(FIT_RECORDS)
            allowed["fitres.parameters"] = "empty-arrays"
        return allowed
    if message_type == "train":
        return {**FIT_RECORDS, "fitres.parameters": "arrays"}
    if message_type == "evaluate":
        return dict(EVALUATE_RECORDS)
    raise PrivacyBoundaryError(f"a device never answers {message_type!r} messages")


def check_reply(content, message_type: str, stage: str | None, secure_aggregation: bool,
                expected_shapes: list[tuple[int, ...]] | None = None, uniform_weight: bool = False) -> None:
    """Raise PrivacyBoundaryError unless every record and key of ``content`` is listed for this reply and every
    value is of the kind the table says (``expected_shapes``: the model's, from the request)."""
    allowed = allowed_records(message_type, stage, secure_aggregation)
    for name, info in describe(content).items():
        rule = allowed.get(name)
        if rule is None:
            raise PrivacyBoundaryError(f"{message_type} reply carries record {name!r}, which is not in the privacy "
                                       f"boundary (allowed: {sorted(allowed)})")
        if rule in ("arrays", "empty-arrays"):
            carries_data = any(item["bytes"] for item in info["items"].values())
            if info["kind"] != "arrays" or (rule == "empty-arrays" and carries_data):
                raise PrivacyBoundaryError(f"{message_type} reply would send un-masked arrays in {name!r} while "
                                           "secure aggregation is on")
            continue
        keys = set(info.get("keys", info.get("items", {})))
        extra = keys - set(rule)
        if extra:
            raise PrivacyBoundaryError(f"{message_type} reply would send {sorted(extra)} in {name!r}; "
                                       f"the boundary allows only {sorted(rule)}")
    check_values(content, message_type, stage, expected_shapes, uniform_weight)


def check_values(content, message_type: str, stage: str | None, expected_shapes, uniform_weight: bool) -> None:
    """The values of the listed records: masked integers of the model's size, finite metrics, no free text."""
    from flwr.compat.common.parameter import bytes_to_ndarray

    def fail(what: str):
        raise PrivacyBoundaryError(f"{message_type} reply: {what}")

    for name, rec in content.metric_records.items():
        for key, value in rec.items():
            if not all(math.isfinite(float(v)) for v in (value if isinstance(value, list) else [value])):
                fail(f"{name}.{key} is not a finite number")
    for name in ("fitres.metrics", "evaluateres.metrics"):
        for key, value in content.config_records.get(name, {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                fail(f"{name}.{key} must be a finite number")
    fit_metrics = content.config_records.get("fitres.metrics", {})
    if fit_metrics.get("declined", 0) not in (0, 1):
        fail("declined must be 0 or 1")
    for name in ("fitres.status", "evaluateres.status"):
        if name in content.config_records and content.config_records[name].get("message", "") not in STATUS_MESSAGES:
            fail(f"{name} carries a free-text message")
    count = content.metric_records.get("fitres.num_examples", {}).get("num_examples")
    if uniform_weight and count is not None and count != 1:
        fail("num_examples must be 1 with clipped updates (uniform weights)")
    shapes = [tuple(s) for s in expected_shapes or []]
    if stage == "collect_masked_vectors" and SECAGG in content.config_records:
        masked = [bytes_to_ndarray(b) for b in content.config_records[SECAGG].get("masked_params", [])]
        if any(a.dtype.kind not in "iu" for a in masked):
            fail("the masked vector is not integer data")
        if shapes and [tuple(a.shape) for a in masked[1:]] != shapes:
            fail("the masked vector does not have the model's size")
    ckks = content.config_records.get(CKKS_RECORD)
    if stage == f"ckks_{CKKS_FIT}" and ckks is not None:
        blobs, name = ckks.get(CKKS_CIPHERTEXTS, []), ckks.get(CKKS_KEY_ID, "")
        if not isinstance(blobs, list) or not blobs or not all(isinstance(b, bytes) for b in blobs):
            fail("the encrypted update is not a list of ciphertexts")
        if not (isinstance(name, str) and len(name) == 16 and all(c in "0123456789abcdef" for c in name)):
            fail("the CKKS key id is not 16 hex digits")
    if stage == f"ckks_{CKKS_DECRYPT}" and ckks is not None:
        total = ckks.get(CKKS_SUM)
        if not isinstance(total, bytes) or len(total) % 8 or not np.isfinite(np.frombuffer(total, np.float64)).all():
            fail("the decrypted sum is not finite float64 values")
    if message_type == "train" and stage is None and "fitres.parameters" in content.array_records:
        arrays = list(content.array_records["fitres.parameters"].values())
        if arrays and shapes:
            got = [tuple(a.numpy().shape) for a in arrays]
            if got != shapes or any(not np.isfinite(a.numpy()).all() for a in arrays):
                fail("the update does not have the model's shapes or is not finite")


def public_error(msg, error: PublicError):
    """The only kind of error reply a device sends: a fixed code and its fixed text."""
    from flwr.app import Error, Message

    return Message(Error(code=int(error), reason=error.reason), reply_to=msg)


def request_stage(msg) -> str | None:
    """The secure-aggregation stage a request asks for, as the table names it: SecAgg+'s, or CKKS's prefixed
    ``ckks_``; None for any other message."""
    records = msg.content.config_records
    if SECAGG in records:
        return records[SECAGG].get("stage")
    if CKKS_RECORD in records:
        return f"ckks_{records[CKKS_RECORD].get(CKKS_STAGE)}"
    return None


def guard(msg, ctxt, handle: Callable[[], object], *, secure_aggregation: Callable[[], bool],
          uniform_weight: Callable[[], bool], audit_dir: Callable[[], str | None]):
    """Run ``handle()`` (the device's whole handling of ``msg``) inside the boundary; returns what may leave."""
    stage = request_stage(msg)
    kind = msg.metadata.message_type
    try:
        expected = _request_shapes(msg)
        reply = handle()
        if reply.has_error():
            log.error("%s message (stage %s) failed inside the device: %s", kind, stage, reply.error)
            return public_error(msg, PublicError.DEVICE_FAILED)
        check_reply(reply.content, kind, stage, secure_aggregation(), expected, uniform_weight())
    except DeviceRefusal as refusal:
        log.warning("%s message (stage %s): %s (sent: %s)", kind, stage, refusal, refusal.public.reason)
        return public_error(msg, refusal.public)
    except PrivacyBoundaryError as err:
        log.error("%s message (stage %s): reply stopped at the privacy boundary: %s", kind, stage, err)
        return public_error(msg, PublicError.BOUNDARY_REFUSED)
    except Exception:  # anything else: full details stay here, a fixed code leaves
        log.exception("%s message (stage %s) failed on the device", kind, stage)
        return public_error(msg, PublicError.DEVICE_FAILED)
    folder = audit_dir()
    if folder:
        entry = {"time": time.time(), "node": ctxt.node_id, "type": kind, "stage": stage,
                 "records": describe(reply.content)}
        path = Path(folder) / f"node_{ctxt.node_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(entry, default=lambda o: str(np.dtype(o)) if not isinstance(o, str) else o) + "\n")
    return reply


def make_boundary_mod(secure_aggregation: bool, audit_dir: str | None = None, uniform_weight: bool = False):
    """:func:`guard` as a ClientApp mod with fixed settings (the ClientApp reads its settings per message)."""

    def boundary_mod(msg, ctxt, call_next):
        return guard(msg, ctxt, lambda: call_next(msg, ctxt), secure_aggregation=lambda: secure_aggregation,
                     uniform_weight=lambda: uniform_weight, audit_dir=lambda: audit_dir)

    return boundary_mod


def _request_shapes(msg) -> list[tuple[int, ...]] | None:
    """The model's parameter shapes, from the global model the request carries (None when it carries none)."""
    if not len(msg.content.array_records.get("fitins.parameters", {})):
        return None
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    return [a.shape for a in parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, True).parameters)]


@contextlib.contextmanager
def local_log(path: Path | None) -> Iterator[None]:
    """Route fl-ser's log records to the device's own log file while it handles one message, and nowhere else.

    In simulation a device's process forwards its console to the server's when asked (``verbose``); on a
    SuperNode the console is the device owner's. Either way fl-ser's device-side records (which may name files
    and utterances) go only to ``path``, which lies in the device's own folder."""
    logger = logging.getLogger("fl_ser")
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    before = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, _ = before
        logger.setLevel(before[1])
        handler.close()

