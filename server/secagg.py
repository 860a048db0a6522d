"""SecAgg+ for fl-ser: Flower's workflow, with num_shares growing as log(n) and setup-stage dropouts handled.

Flower 1.42's ``SecAggPlusWorkflow`` keeps a device that never answered the
*setup* stage in its list of sampled devices, so at unmasking it counts as
"dropped after sharing keys" and the surviving devices are asked for key shares
they never received: they fail (``KeyError`` in ``secaggplus_mod``) and the
round is lost. :class:`SecAggPlus` removes such devices from the protocol right
after setup (they never sent a key, so nobody masked with them); dropouts in
later stages are Flower's own, unchanged recovery.
"""

from __future__ import annotations

import math

from flwr.server.workflow import SecAggPlusWorkflow
from omegaconf import DictConfig


class SecAggPlus(SecAggPlusWorkflow):
    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        keyed = set(state.active_node_ids)  # the devices that sent their public keys
        state.sampled_node_ids = keyed
        state.nid_to_neighbours = {nid: nbrs & keyed for nid, nbrs in state.nid_to_neighbours.items() if nid in keyed}
        return ok


def secagg_workflow(cfg: DictConfig, num_sampled: int):
    """SecAgg+ with num_shares growing logarithmically in the number of sampled devices (when 'auto')."""
    from fl_ser.privacy.secagg_crypto import use_in_flower
    from server.server_app import reply_timeout

    use_in_flower()  # the server recombines secrets with fl-ser's (compatible, faster) secret sharing
    agg = cfg.aggregation
    shares = agg.num_shares
    if shares == "auto":  # Bell et al. 2020: O(log n) neighbours suffice; keep it odd and within the cohort
        shares = min(num_sampled, 2 * math.ceil(math.log2(num_sampled)) + 1)
        shares = 1.0 if shares >= num_sampled else shares  # 1.0 = everybody (Flower's convention)
    uniform = bool(cfg.privacy.update_clipping.enabled)
    return SecAggPlus(num_shares=shares, reconstruction_threshold=agg.reconstruction_threshold,
                      max_weight=1.0 if uniform else float(agg.max_weight),
                      clipping_range=float(agg.clipping_range), timeout=reply_timeout(cfg))


