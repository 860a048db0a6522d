"""User-level differential privacy for the aggregate (DP-FedAvg, McMahan et al. 2018), before any server optimiser.

Devices clip their update to L2 norm C (the C this wrapper sends, which each
device checks against its own policy, :mod:`fl_ser.privacy.policy`) and are
weighted uniformly, so
one device changes the mean of n updates by at most C / n. Gaussian noise of
std z * C / n is added to that mean, either here after SecAgg+ unmasking
(``placement=server``) or by the devices before masking (``placement=
distributed``, each adds std z * C / sqrt(m) to its own update, so the server
never sees an un-noised sum; if only n < m devices finish, the server tops the
noise up to the calibrated level). The noisy mean then goes to the inner
strategy, so FedAdam's or FedProx's server step is post-processing of a DP
release (Flower's own DP wrappers add noise *after* the inner strategy, which is
not DP for adaptive server optimisers).

Noise comes from OpenDP's Gaussian mechanism on its CSPRNG
(:mod:`fl_ser.privacy.noise`), never from numpy's statistical generators.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from fl_ser.privacy.noise import add_gaussian
from fl_ser.protocol import KEY_CLIPPING_NORM, KEY_DEVICE_NOISE_STD
from server.wrapped_strategy import WrappedStrategy

log = logging.getLogger("fl_ser.server")


class UserLevelDP(WrappedStrategy):
    """Wrap a strategy: send C to devices, aggregate uniformly, add calibrated Gaussian noise, then delegate."""

    def __init__(self, strategy: Strategy, clipping_norm: float, noise_multiplier: float, placement: str):
        super().__init__(strategy)
        if clipping_norm <= 0:
            raise ValueError("privacy.update_clipping.clipping_norm must be positive")
        if placement not in ("server", "distributed"):
            raise ValueError(f"privacy.user_level.placement must be 'server' or 'distributed', got {placement!r}")
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier
        self.placement = placement
        self.sampled: set[str] = set()
        self.last_round: dict = {}

    def __repr__(self) -> str:
        return (f"UserLevelDP({self.strategy!r}, C={self.clipping_norm}, z={self.noise_multiplier}, "
                f"placement={self.placement})")

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        extra = {KEY_CLIPPING_NORM: self.clipping_norm}
        if self.noise_multiplier > 0 and self.placement == "distributed":
            extra[KEY_DEVICE_NOISE_STD] = self.noise_multiplier * self.clipping_norm / math.sqrt(len(instructions))
        for _, ins in instructions:
            ins.config.update(extra)
        self.sampled = {proxy.cid for proxy, _ in instructions}
        # Until updates arrive every sampled device counts as dropped (SecAgg+ may halt before aggregate_fit).
        self.last_round = {"participants": 0, "server_noise_std": 0.0, "failures": 0, "dropped": sorted(self.sampled)}
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        n, m = len(results), len(self.sampled)
        dropped = sorted(self.sampled - {proxy.cid for proxy, _ in results})
        if failures or dropped:
            log.warning("round %s: %d of %d sampled devices returned an update; dropped out: %s (%d failures)",
                        server_round, n, m, ", ".join(dropped) or "none", len(failures))
        # Uniform mean of the (clipped) parameters. Under SecAgg+ every result already holds the unmasked mean.
        arrays = [parameters_to_ndarrays(r.parameters) for _, r in results]
        mean = [np.mean(np.stack(layer), axis=0) for layer in zip(*arrays, strict=True)]
        std = 0.0
        if self.noise_multiplier > 0:
            target = self.noise_multiplier * self.clipping_norm / n
            already = 0.0
            if self.placement == "distributed":  # n shares of std zC/sqrt(m), averaged over n
                already = self.noise_multiplier * self.clipping_norm * math.sqrt(n / m) / n
            std = math.sqrt(max(target**2 - already**2, 0.0))
            if std > 0:
                mean = add_gaussian(mean, std)
        self.last_round = {"participants": n, "server_noise_std": std, "failures": len(failures), "dropped": dropped}
        noised = ndarrays_to_parameters(mean)
        for _, r in results:
            r.parameters = noised
            r.num_examples = 1
        return self.strategy.aggregate_fit(server_round, results, [])

