"""The device's half of ``aggregation=ckks``: encrypt the update it sends, decrypt only a round's sum.

A ClientApp mod in the SecAgg+ mod's place (inside the policy guard, outside
the update mod, so it encrypts the clipped and noised update):

* ``fit`` (:data:`~fl_ser.protocol.CKKS_FIT`): the device trains as usual; the
  mod rounds the update, times its weight, to the public grid
  (:func:`fl_ser.privacy.ckks.quantise`), appends the weight, and sends it only
  as CKKS ciphertexts under the federation's key, with the key's public name.
  No float array leaves. A TRAIN message outside the CKKS protocol is refused:
  the device, not the server, decides that its update leaves encrypted.
* ``decrypt`` (:data:`~fl_ser.protocol.CKKS_DECRYPT`): the device decrypts a
  sum the server says holds at least the device's own minimum of updates
  (:func:`required_contributors`) and answers with the sum rounded to the grid
  (:func:`fl_ser.privacy.ckks.decrypt`), nothing else. It cannot check the
  server's count: the guarantee assumes an honest-but-curious server.

Where the key is (:func:`key_path`): the node config's ``ckks-key=PATH``;
else ``DEVICE_DIR/ckks/secret.key`` (``experiments.lab prepare`` writes it);
else, in simulation only, one key per run that the first device creates in the
devices' side of the disk (``privacy.ledger_dir/ckks/RUN_UID.key``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fl_ser.privacy.ckks import (
    CKKSParams,
    decrypt,
    encrypt,
    key_id,
    load_ciphertexts,
    open_secret_context,
    quantise,
    read_secret_context,
)
from fl_ser.privacy.refusals import PolicyRefused
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

log = logging.getLogger("fl_ser.device")


def params_of(cfg: DictConfig) -> CKKSParams:
    return CKKSParams.from_config(cfg.aggregation.ckks)


def grid_settings(cfg: DictConfig) -> tuple[float, int, int]:
    """``(clipping_range, quantization_range, threshold)`` of a CKKS round, for distributed DP: the same grid
    SecAgg+ would use, from the device's own config; a sum must hold ``min_contributors``."""
    agg = cfg.aggregation
    return float(agg.clipping_range), int(agg.quantization_range), int(agg.min_contributors)


def precision(cfg: DictConfig) -> float:
    """The public grid the update is rounded to: distributed DP's share grid, else ``2**-precision_bits``."""
    from fl_ser.privacy.budget import distributed
    from fl_ser.privacy.distributed import SecAggGrid

    if distributed(cfg):
        clipping_range, quantization_range, _ = grid_settings(cfg)
        return SecAggGrid(clipping_range, quantization_range).step
    return 2.0 ** -int(cfg.aggregation.precision_bits)


def required_contributors(cfg: DictConfig, cohort: int | None) -> int:
    """The fewest updates a sum this device decrypts must hold: ``aggregation.min_contributors``, and under
    distributed DP the k its noise share was calibrated to."""
    from fl_ser.privacy.budget import distributed, distributed_settings

    least = int(cfg.aggregation.min_contributors)
    if distributed(cfg):
        least = max(least, distributed_settings(cfg, grid_settings(cfg)[2], cohort).min_contributors)
    return max(least, 2)


def key_path(cfg: DictConfig, node_config, device_dir: str | None) -> Path:
    if "ckks-key" in node_config:
        return Path(str(node_config["ckks-key"])).expanduser()
    if device_dir is not None:
        return Path(device_dir) / "ckks" / "secret.key"
    return Path(str(cfg.privacy.ledger_dir)) / "ckks" / f"{cfg.run_uid}.key"


@functools.lru_cache(maxsize=4)
def _key(path: str, params: CKKSParams, create: bool):
    # create: the first device of a simulated run makes the run's key, the rest load it
    return open_secret_context(path, params) if create else read_secret_context(path, params)


def device_key(cfg: DictConfig, node_config, device_dir: str | None, simulated: bool):
    """This device's secret CKKS context (created only for a simulated run without a key file)."""
    path = key_path(cfg, node_config, device_dir)
    return _key(str(path), params_of(cfg), simulated and device_dir is None and "ckks-key" not in node_config)


def make_ckks_mod(key_of, settings_of):
    """The mod; ``key_of(context)`` gives the device's secret context, ``settings_of(context)`` its
    ``(cfg, cohort)``."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.common import Parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    def ckks_mod(msg, ctxt, call_next):
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        record = msg.content.config_records.get(CKKS_RECORD)
        stage = record.get(CKKS_STAGE) if record is not None else None
        cfg, cohort = settings_of(ctxt)
        params = params_of(cfg)
        if stage == CKKS_DECRYPT:
            contributors, length = int(record[CKKS_CONTRIBUTORS]), int(record[CKKS_LENGTH])
            least = required_contributors(cfg, cohort)
            if contributors < least:
                raise PolicyRefused(f"the server asks to decrypt a sum of {contributors} updates; this device "
                                    f"decrypts only sums of at least {least}")
            ctx = key_of(ctxt)
            total = decrypt(ctx, load_ciphertexts(ctx, record[CKKS_CIPHERTEXTS], params, length), precision(cfg),
                            length)
            log.info("decrypted the round's sum of %d updates (%d values)", contributors, length)
            return Message(RecordDict({CKKS_RECORD: ConfigRecord({CKKS_SUM: total.astype(np.float64).tobytes()})}),
                           reply_to=msg)
        if stage != CKKS_FIT:
            raise PolicyRefused("the server asks for an update outside the CKKS protocol; this device sends its "
                                "update only encrypted (aggregation=ckks)")
        ctx = key_of(ctxt)  # before training: without its key the device spends no privacy on an update it cannot send
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        weight = float(fitres.num_examples)
        flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() * weight
                               for a in parameters_to_ndarrays(fitres.parameters)] + [np.array([weight])])
        blobs = encrypt(ctx, quantise(flat, precision(cfg)), params)
        fitres.parameters = Parameters(tensors=[], tensor_type="numpy.ndarray")
        fitres.num_examples = 1  # the weight travels encrypted, in the last slot
        content = compat.fitres_to_recorddict(fitres, keep_input=True)
        content.config_records[CKKS_RECORD] = ConfigRecord({CKKS_CIPHERTEXTS: blobs, CKKS_KEY_ID: key_id(ctx)})
        reply.content = content
        return reply

    return ckks_mod
