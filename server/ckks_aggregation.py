"""``aggregation=ckks``: the server adds CKKS-encrypted updates it cannot read; a key-holding device decrypts the sum.

A fit workflow for Flower's legacy ``DefaultWorkflow`` (the slot SecAgg+ fills
otherwise), over the public ``Grid`` API only. Per round:

1. ``fit``: every sampled device trains and answers with its update (weighted
   by its example count, the weight itself in the last slot) encrypted under
   the federation's CKKS key (:mod:`clients.ckks_mod`). One exchange with
   every device, where SecAgg+ needs four; step 3 adds one message to one.
2. The server loads each reply under a keyless context
   (:func:`fl_ser.privacy.ckks.keyless_context`: the public parameters, no
   key), drops malformed ones and those under another key than the round's
   majority, and adds the rest slot-wise.
3. ``decrypt``: the encrypted sum goes to one contributor, drawn with the OS's
   CSPRNG; it decrypts and answers with the sum only, rounded to the public
   grid (:func:`fl_ser.privacy.ckks.decrypt`). If it fails, the next one drawn
   is asked (``aggregation.decrypt_attempts`` in all).
4. The mean goes to the strategy as every result's parameters (as SecAgg+'s
   unmasked aggregate does), so ``ReplyCheck``, user-level noise and the
   distributed DP step work unchanged.

Trust: the server sees ciphertexts and the sum, the view SecAgg+ gives it, if
it is honest-but-curious and colludes with no device. Every device holds the
same secret key, so a server colluding with any one device reads every
update: that is why SecAgg+ stays the default (README "Homomorphic
encryption"). A device that drops out after encrypting is simply not in the
sum; a round with fewer than ``min_contributors`` updates is not decrypted.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter

import numpy as np

from fl_ser.privacy.ckks import CKKSError, CKKSParams, add_all, keyless_context, load_ciphertexts
from fl_ser.protocol import (
    CKKS_CIPHERTEXTS,
    CKKS_CONTRIBUTORS,
    CKKS_DECRYPT,
    CKKS_FIT,
    CKKS_KEY_ID,
    CKKS_LENGTH,
    CKKS_RECORD,
    CKKS_STAGE,
    CKKS_SUM,
)
from fl_ser.round_report import NO_REPLY, RoundReport, error_cause

log = logging.getLogger("fl_ser.server")


class CKKSAggregation:
    """The ``fit_workflow`` of a round under CKKS; :attr:`round_report` says who was sampled, lost and summed."""

    def __init__(self, params: CKKSParams, min_contributors: int = 2, decrypt_attempts: int = 3,
                 timeout: float | None = None, threshold: int = 2, quantization_range: int = 2 ** 22):
        if min_contributors < 2:
            raise ValueError(f"aggregation.min_contributors={min_contributors}: a sum of one device's update is "
                             "that update; it must be at least 2")
        if decrypt_attempts < 1:
            raise ValueError(f"aggregation.decrypt_attempts={decrypt_attempts} must be at least 1")
        self.params = params
        self.min_contributors = int(min_contributors)
        self.decrypt_attempts = int(decrypt_attempts)
        self.timeout = timeout
        self.threshold = int(threshold)  # what distributed DP's contributors_bound starts from, as SecAgg+'s
        self.quantization_range = int(quantization_range)  # distributed DP's share grid
        self.context = keyless_context(params)
        self._report = RoundReport()
        self.last_round: dict = {}  # the decryptor, and the bytes and seconds of the round's exchanges

    @property
    def round_report(self) -> dict:
        return self._report.as_dict()

    def __call__(self, grid, context) -> None:
        from flwr.app import ConfigRecord, Message, MessageType
        from flwr.common import Code, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                      keep_input=True)
        instructions = context.strategy.configure_fit(server_round=current_round, parameters=parameters,
                                                      client_manager=context.client_manager)
        self._report = report = RoundReport(sampled=sorted(proxy.node_id for proxy, _ in instructions))
        if not instructions:
            report.halted_at = CKKS_FIT
            return
        shapes = [a.shape for a in parameters_to_ndarrays(parameters)]
        length = sum(int(np.prod(s)) for s in shapes) + 1  # the weighted update, then the weight
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = []
        for proxy, fitins in instructions:
            content = compat.fitins_to_recorddict(fitins, True)
            content.config_records[CKKS_RECORD] = ConfigRecord({CKKS_STAGE: CKKS_FIT})
            messages.append(Message(content=content, dst_node_id=proxy.node_id, message_type=MessageType.TRAIN,
                                    group_id=str(current_round)))
        replies = self._exchange(grid, messages, CKKS_FIT)
        encrypted, results, failures, keys = {}, [], [], {}
        for nid, reply in replies.items():
            if reply.has_error():
                failures.append(Exception(reply.error))
                continue
            fitres = compat.recorddict_to_fitres(reply.content, False)
            if fitres.status.code != Code.OK:
                failures.append((proxies[nid], fitres))
                report.lost(CKKS_FIT, nid, f"status {fitres.status.code.name.lower()}")
                continue
            record = reply.content.config_records.get(CKKS_RECORD)
            try:
                if record is None or CKKS_CIPHERTEXTS not in record:
                    raise CKKSError("no encrypted update")
                encrypted[nid] = load_ciphertexts(self.context, record[CKKS_CIPHERTEXTS], self.params, length)
            except CKKSError as err:
                self._reject(nid, str(err), failures)
                continue
            keys[nid] = str(record.get(CKKS_KEY_ID, ""))
            results.append((proxies[nid], fitres))
        if keys:  # the round's key: the one most devices encrypt under; a device under another is misconfigured
            key, _ = Counter(keys.values()).most_common(1)[0]
            for nid in [n for n, k in keys.items() if k != key]:
                self._reject(nid, f"update under CKKS key {keys[nid]}, the round's is {key}: that device holds "
                                  "another federation's key (re-run experiments.lab prepare, or give it ckks-key=)",
                             failures)
                del encrypted[nid]
                results = [(p, r) for p, r in results if p.node_id != nid]
        if len(encrypted) < self.min_contributors:
            log.error("round %s: %d encrypted updates, fewer than the %d a sum must hold: not decrypted",
                      current_round, len(encrypted), self.min_contributors)
            report.halted_at = CKKS_FIT
            return
        total = add_all(list(encrypted.values()))
        summed = self._decrypt(grid, total, sorted(encrypted), length, current_round)
        if summed is None:
            report.halted_at = CKKS_DECRYPT
            return
        weight = float(summed[-1])
        if not weight > 0:
            log.error("round %s: the decrypted total weight is %s: nothing to average", current_round, weight)
            report.halted_at = CKKS_DECRYPT
            return
        mean, offset = [], 0
        for shape, array in zip(shapes, parameters_to_ndarrays(parameters), strict=True):
            size = int(np.prod(shape))
            mean.append((summed[offset:offset + size] / weight).reshape(shape).astype(array.dtype))
            offset += size
        report.participants = sorted(encrypted)
        aggregate = ndarrays_to_parameters(mean)
        for _, fitres in results:
            fitres.parameters = aggregate
        new, metrics = context.strategy.aggregate_fit(current_round, results, failures)
        if new:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(new, True)
            context.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics)

    def _exchange(self, grid, messages: list, stage: str) -> dict:
        """Send ``messages``, return the replies by the asking node id; the unanswered are lost at ``stage``."""
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        out = {}
        for reply in replies:
            nid = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            out[nid] = reply
            if reply.has_error():
                self._report.lost(stage, nid, error_cause(reply.error.code))
        for nid in sorted({m.metadata.dst_node_id for m in messages} - set(out)):
            self._report.lost(stage, nid, NO_REPLY)
        return out

    def _reject(self, nid: int, reason: str, failures: list) -> None:
        log.warning("device %s's encrypted update is left out of the round: %s", nid, reason)
        self._report.reject(CKKS_FIT, nid, reason)
        failures.append(CKKSError(f"device {nid}: {reason}"))

    def _decrypt(self, grid, total: list, contributors: list[int], length: int, current_round: int):
        """The plaintext sum from a contributor, trying up to ``decrypt_attempts`` of them (drawn with the OS's
        CSPRNG, so the server cannot be steered to one); None when none answers with a well-formed sum."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        blobs = [v.serialize() for v in total]
        candidates = list(contributors)
        secrets.SystemRandom().shuffle(candidates)
        for nid in candidates[:self.decrypt_attempts]:
            content = RecordDict({CKKS_RECORD: ConfigRecord({
                CKKS_STAGE: CKKS_DECRYPT, CKKS_CIPHERTEXTS: blobs, CKKS_LENGTH: length,
                CKKS_CONTRIBUTORS: len(contributors)})})
            message = Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN,
                              group_id=str(current_round))
            reply = self._exchange(grid, [message], CKKS_DECRYPT).get(nid)
            if reply is None or reply.has_error():
                continue
            record = reply.content.config_records.get(CKKS_RECORD)
            raw = record.get(CKKS_SUM) if record is not None else None
            values = np.frombuffer(raw, dtype=np.float64) if isinstance(raw, bytes) and len(raw) % 8 == 0 else None
            if values is None or values.size != length or not np.isfinite(values).all():
                self._report.reject(CKKS_DECRYPT, nid, "the decrypted sum is not the round's size or not finite")
                continue
            self.last_round = {"decryptor": nid, "ciphertexts": len(blobs),
                               "ciphertext_bytes": sum(len(b) for b in blobs)}
            return values.copy()
        log.error("round %s: no contributor decrypted the sum (%d asked)", current_round,
                  min(len(candidates), self.decrypt_attempts))
        return None
