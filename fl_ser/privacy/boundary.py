"""The device's privacy boundary: the complete list of what may leave a device, enforced on every reply.

Every message a device sends passes through :func:`make_boundary_mod`, the
outermost ClientApp mod, which compares it against the table below and refuses
(raises :class:`PrivacyBoundaryError`, so nothing is sent) anything not listed.
Raw audio, features, labels, normaliser statistics and the privacy ledger are
not in the table, so they can never leave. With secure aggregation on, no
float array leaves either: the model update only leaves as SecAgg+ masked
integer vectors, and the server learns only their sum.

What leaves, by reply (``R`` = record name, then the keys allowed in it):

=====================  ===========================================================
SecAgg+ setup          ``secaggplus_configs``: ``pk1``, ``pk2`` (public keys)
SecAgg+ share keys     ``secaggplus_configs``: ``dsts``, ``ctxts`` (encrypted key shares)
SecAgg+ masked vector  ``secaggplus_configs``: ``masked_params`` (masked, quantised update);
                       ``fitres.metrics``: TRAIN_METRICS; ``fitres.num_examples``
                       (1 for every device when updates are clipped); ``fitres.status``;
                       ``fitres.parameters`` present but empty
SecAgg+ unmask         ``secaggplus_configs``: ``nids``, ``shares`` (key shares of neighbours)
train, plain           ``fitres.parameters`` (the clipped update, visible to the server:
                       only with ``aggregation=plain``); the same metrics as above
evaluate (release)     ``evaluateres.loss``, ``evaluateres.num_examples``,
                       ``evaluateres.metrics``: EVALUATE_METRICS; ``evaluateres.status``
=====================  ===========================================================

TRAIN_METRICS are functions of public hyper-parameters and of whether the
device trained (its cumulative DP-SGD epsilon, and whether it declined for lack
of budget). EVALUATE_METRICS are the device's accuracy with the released model:
aggregate statistics of its data that are *not* covered by DP; turn them off
with ``release.device_report=false``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

TRAIN_METRICS = frozenset({"epsilon", "declined"})
EVALUATE_METRICS = frozenset({"uar", "accuracy", "num_utterances", "epsilon"})

SECAGG = "secaggplus_configs"
SECAGG_STAGE_KEYS = {
    "setup": frozenset({"pk1", "pk2"}),
    "share_keys": frozenset({"dsts", "ctxts"}),
    "collect_masked_vectors": frozenset({"masked_params"}),
    "unmask": frozenset({"nids", "shares"}),
}
FIT_RECORDS = {"fitres.metrics": TRAIN_METRICS, "fitres.num_examples": frozenset({"num_examples"}),
               "fitres.status": frozenset({"code", "message"})}
EVALUATE_RECORDS = {"evaluateres.loss": frozenset({"loss"}), "evaluateres.num_examples": frozenset({"num_examples"}),
                    "evaluateres.metrics": EVALUATE_METRICS, "evaluateres.status": frozenset({"code", "message"})}


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
        if stage not in SECAGG_STAGE_KEYS:
            raise PrivacyBoundaryError(f"train reply outside the SecAgg+ protocol (stage {stage!r}) is not allowed")
        allowed: dict[str, frozenset | str] = {SECAGG: SECAGG_STAGE_KEYS[stage]}
        if stage == "collect_masked_vectors":
            allowed.update(FIT_RECORDS)
            allowed["fitres.parameters"] = "empty-arrays"
        return allowed
    if message_type == "train":
        return {**FIT_RECORDS, "fitres.parameters": "arrays"}
    if message_type == "evaluate":
        return dict(EVALUATE_RECORDS)
    raise PrivacyBoundaryError(f"a device never answers {message_type!r} messages")


def check_reply(content, message_type: str, stage: str | None, secure_aggregation: bool) -> None:
    """Raise PrivacyBoundaryError unless every record and key of ``content`` is listed for this reply."""
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


def make_boundary_mod(secure_aggregation: bool, audit_dir: str | None = None) -> Callable:
    """The outermost ClientApp mod: checks every reply and, with ``audit_dir``, logs what left (no values)."""

    def boundary_mod(msg, ctxt, call_next):
        stage = None
        if SECAGG in msg.content.config_records:
            stage = msg.content.config_records[SECAGG].get("stage")
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        check_reply(reply.content, msg.metadata.message_type, stage, secure_aggregation)
        if audit_dir:
            entry = {"time": time.time(), "node": ctxt.node_id, "type": msg.metadata.message_type, "stage": stage,
                     "records": describe(reply.content)}
            path = Path(audit_dir) / f"node_{ctxt.node_id}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(entry, default=lambda o: str(np.dtype(o)) if not isinstance(o, str) else o) + "\n")
        return reply

    return boundary_mod
