"""ClientApp mods between local training and secure aggregation.

Order on the way out (innermost first): local training -> ``fixedclipping_mod``
(Flower's: clips the update to L2 norm C) -> :func:`distributed_noise_mod`
(adds this device's share of the user-level Gaussian noise, when the server asks
for it) -> :func:`secure_aggregation_mod` (Flower's ``secaggplus_mod``: quantises
and masks) -> the privacy boundary.
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

#: Fit-config key carrying the per-device noise std for distributed user-level DP.
KEY_DEVICE_NOISE_STD = "fl-ser.device_noise_std"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod``, with :mod:`fl_ser.privacy.secagg_crypto`'s secret sharing and key parsing
    (the same protocol and messages, faster)."""
    from flwr.client.mod import secaggplus_mod

    from fl_ser.privacy.secagg_crypto import use_in_flower

    use_in_flower()
    return secaggplus_mod(msg, ctxt, call_next)


def distributed_noise_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Add N(0, std^2) to the clipped update before masking, so the server never sees an un-noised sum."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    std = None
    if "fitins.config" in msg.content.config_records:
        std = msg.content.config_records["fitins.config"].get(KEY_DEVICE_NOISE_STD)
    reply = call_next(msg, ctxt)
    if not std or reply.has_error():
        return reply
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    rng = np.random.default_rng(secrets.randbits(128))
    arrays = [a + rng.normal(0.0, float(std), a.shape).astype(a.dtype)
              for a in parameters_to_ndarrays(fit_res.parameters)]
    fit_res.parameters = ndarrays_to_parameters(arrays)
    reply.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return reply
