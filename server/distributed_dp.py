"""The server's half of distributed DP-GD (:mod:`fl_ser.privacy.distributed`): decode SecAgg+'s sum, take the step.

Under ``privacy=distributed`` every device's SecAgg+ input is its noisy,
clipped gradient sum (scaled by the public ``1 / B``) as integers modulo
SecAgg+'s quantisation range. The server learns only their sum:
:class:`DistributedStep` decodes it (:meth:`SecAggGrid.decode`), takes the
DP-GD step ``w - step_size * sum`` from the round's global model, and hands the result
to the inner strategy as the round's one aggregate, so FedAvg keeps it as is
and FedAdam or FedAvgM treat the step as their pseudo-gradient: post-processing
of the DP release either way.

It also keeps the server's own account of the guarantee against itself: each
round's sum holds the shares of the devices whose masked vectors arrived
(``n``); each share was calibrated to ``k`` shares
(:func:`fl_ser.privacy.distributed.contributors_bound`), and SecAgg+ never
unmasks a sum of fewer, so ``n >= k`` and the round's noise multiplier is at
least ``z``; the actual ``z sqrt(n / k)`` is in ``last_round``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from fl_ser.privacy.distributed import DistributedDPGD, SecAggGrid
from server.wrapped_strategy import WrappedStrategy

log = logging.getLogger("fl_ser.server")


class DistributedStep(WrappedStrategy):
    """Wrap a strategy: turn SecAgg+'s sum of distributed DP shares into a DP-GD step, then delegate."""

    def __init__(self, strategy: Strategy, grid: SecAggGrid, step_size: float, settings: DistributedDPGD):
        super().__init__(strategy)
        if not step_size > 0:
            raise ValueError(f"privacy.distributed.step_size (the DP-GD step) must be positive, got {step_size}")
        self.grid = grid
        self.step_size = float(step_size)
        self.settings = settings
        self.current: list[np.ndarray] = []
        self.last_round: dict = {}

    def __repr__(self) -> str:
        return (f"DistributedStep({self.strategy!r}, step={self.step_size}, z={self.settings.noise_multiplier:.4g}, "
                f"k={self.settings.min_contributors}, grid={self.grid.step:g})")

    def configure_fit(self, server_round, parameters, client_manager):
        self.current = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        n, k = len(results), self.settings.min_contributors
        if n < k:  # SecAgg+ halts such a round before unmasking; never use one that claims to be
            log.error("round %s: %d distributed shares, fewer than the %d each was calibrated to: discarded",
                      server_round, n, k)
            return None, {}
        # Under SecAgg+ every result holds the same dequantised mean of the n encoded shares.
        total = self.grid.decode(parameters_to_ndarrays(results[0][1].parameters), n)
        stepped = [(w.astype(np.float64) - self.step_size * g).astype(w.dtype)
                   for w, g in zip(self.current, total, strict=True)]
        self.last_round = {"contributors": n, "noise_multiplier": self.settings.noise_multiplier * math.sqrt(n / k)}
        proposal = ndarrays_to_parameters(stepped)
        for _, r in results:
            r.parameters = proposal
            r.num_examples = 1
        return self.strategy.aggregate_fit(server_round, results, failures)
