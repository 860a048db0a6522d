"""The server's secure aggregation: the fit workflow ``aggregation=`` names, built from the experiment config.

* ``secagg_plus``: :class:`fl_ser.flower_compat.SecAggPlus` with num_shares
  growing as log(n). The workflow itself (Flower's, with fl-ser's crypto, the
  mask-scheme check at setup and the setup-dropout fix) lives in
  :mod:`fl_ser.flower_compat`, with every other replacement of Flower internals.
* ``ckks``: :class:`server.ckks_aggregation.CKKSAggregation`.
* ``plain``: none (Flower's default fit: the server reads every update).

Both secure workflows expose ``round_report``, ``threshold`` (the fewest
updates a sum may hold) and ``quantization_range`` (distributed DP's grid).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig


def fit_workflow(cfg: DictConfig, num_sampled: int):
    """The workflow of ``cfg.aggregation`` for rounds of ``num_sampled`` devices (None: plain aggregation)."""
    name = str(cfg.aggregation.name)
    if name == "secagg_plus":
        return secagg_workflow(cfg, num_sampled)
    if name == "ckks":
        return ckks_workflow(cfg, num_sampled)
    if name == "plain":
        return None
    raise ValueError(f"aggregation={name}: fl-ser aggregates with plain, secagg_plus or ckks")


def ckks_workflow(cfg: DictConfig, num_sampled: int):
    """CKKS aggregation; under distributed DP no sum of fewer than the k shares were calibrated to is decrypted."""
    from fl_ser.privacy.budget import distributed
    from fl_ser.privacy.ckks import CKKSParams
    from fl_ser.privacy.distributed import contributors_bound
    from server.ckks_aggregation import CKKSAggregation
    from server.server_app import reply_timeout

    agg = cfg.aggregation
    least = int(agg.min_contributors)
    if distributed(cfg):
        least = contributors_bound(cfg.privacy.distributed.get("min_contributors"), least, num_sampled)
    if least > num_sampled:
        raise ValueError(f"aggregation=ckks: a sum must hold {least} updates, more than the {num_sampled} devices of "
                         "a round (lower aggregation.min_contributors or privacy.distributed.min_contributors)")
    return CKKSAggregation(CKKSParams.from_config(agg.ckks), min_contributors=least,
                           decrypt_attempts=int(agg.decrypt_attempts), timeout=reply_timeout(cfg),
                           threshold=int(agg.min_contributors), quantization_range=int(agg.quantization_range))


def secagg_workflow(cfg: DictConfig, num_sampled: int):
    """SecAgg+ with num_shares growing logarithmically in the number of sampled devices (when 'auto'), and a
    reconstruction threshold above half of the shares (devices refuse a lower one, see fl_ser.privacy.policy)."""
    from fl_ser.flower_compat import SecAggPlus
    from fl_ser.privacy.budget import distributed, uniform_weights
    from fl_ser.privacy.distributed import contributors_bound
    from server.server_app import reply_timeout

    agg = cfg.aggregation
    shares = agg.num_shares
    if shares == "auto":  # Bell et al. 2020: O(log n) neighbours suffice; keep it odd and within the cohort
        shares = min(num_sampled, 2 * math.ceil(math.log2(num_sampled)) + 1)
        shares = 1.0 if shares >= num_sampled else shares  # 1.0 = everybody (Flower's convention)
    count = num_sampled if shares == 1.0 else int(shares)  # the shares each device makes
    fraction = float(agg.reconstruction_threshold)
    # Flower rounds fraction x shares (0.6 of 4 shares is 2: half). Above half, a server that lies about who
    # dropped out still cannot collect both of an honest device's secrets (Bonawitz et al. 2017).
    threshold = min(count, max(2, round(fraction * count), count // 2 + 1)) if fraction < 1 else int(fraction)
    uniform = uniform_weights(cfg)
    # Distributed DP: devices calibrate their noise shares to k; a round with fewer masked vectors halts unsummed.
    least = contributors_bound(cfg.privacy.distributed.get("min_contributors"), threshold, num_sampled) \
        if distributed(cfg) else 0
    if least > num_sampled:
        raise ValueError(f"privacy.distributed.min_contributors={least} exceeds the {num_sampled} devices of a round")
    return SecAggPlus(min_contributors=least, num_shares=shares, reconstruction_threshold=threshold,
                      max_weight=1.0 if uniform else float(agg.max_weight),
                      clipping_range=float(agg.clipping_range), timeout=reply_timeout(cfg))
