"""What an experiment plans to spend, and the noise that meets a target epsilon: one place for both apps.

``privacy.dp_sgd.target_epsilon`` (set epsilon, not noise) asks each device
for the noise multiplier whose planned spend over the run, normaliser
release included, meets the target (:func:`sample_level_noise`). The device
computes it from its own data size and the experiment's plan, never from a
number the server sends, so a server cannot lower it; the server computes the
same figure for its log and for the distributed mode's accounting.
``privacy.user_level.target_epsilon`` is met the same way by the server's
user-level noise (:func:`user_level_noise`), and each device checks the share
it is asked to add against its own policy.

The plan assumes a device trains in every round (``rounds``), so with client
sampling (``clients_per_round`` < devices) it meets the target with room to
spare; the device's lifetime budget (``epsilon_budget``) is enforced on top.
A calibration is a bisection on the accountant (about a second for Poisson
batches), so its result is kept per plan: a device asks for it every round.
:func:`distributed_settings` builds the distributed mode's settings the same
way for the device, the server and the start-up check.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # the accountant imports Opacus (and torch): SecAgg+'s light stages read this module without it
    from fl_ser.privacy.accountant import Entry
    from fl_ser.privacy.distributed import DistributedDPGD

PLACEMENTS = ("local", "distributed")


def placement(cfg: DictConfig) -> str:
    """Where DP-SGD's noise is added: ``local`` (each device's own DP-SGD) or ``distributed`` (shares of one
    DP-GD step's noise under SecAgg+, :mod:`fl_ser.privacy.distributed`)."""
    where = str(cfg.privacy.dp_sgd.get("placement", "local"))
    if where not in PLACEMENTS:
        from fl_ser.privacy.accountant import PrivacyBudgetError

        raise PrivacyBudgetError(f"privacy.dp_sgd.placement={where!r}: choose local or distributed")
    return where


def distributed(cfg: DictConfig) -> bool:
    """Sample-level DP with its noise distributed across devices (``privacy=distributed``)."""
    dp = cfg.privacy.get("dp_sgd")
    return dp is not None and bool(dp.enabled) and placement(cfg) == "distributed"


def uniform_weights(cfg: DictConfig) -> bool:
    """Every device weighs the same in the aggregate: its update is clipped (user-level sensitivity), or its reply
    is a distributed DP share (a sum, not a mean)."""
    return bool(cfg.privacy.update_clipping.enabled) or distributed(cfg)


def normaliser_release(cfg: DictConfig) -> list[Entry]:
    """The normaliser's one release (``privacy.normalization.mode=dp``), or nothing."""
    norm = cfg.privacy.normalization
    return [(float(norm.noise_multiplier), 1.0, 1)] if str(norm.mode) == "dp" else []


def round_spend(cfg: DictConfig, num_examples: int, noise_multiplier: float) -> list[Entry]:
    """What one round spends on a device holding ``num_examples`` utterances (against the aggregator, for
    distributed DP: one full-batch DP-GD step; otherwise :func:`fl_ser.training.planned_entries`)."""
    from fl_ser.training import LocalTrainConfig, planned_entries

    if placement(cfg) == "distributed":
        return [(float(noise_multiplier), 1.0, 1)]
    train = LocalTrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    return planned_entries(num_examples, train, noise_multiplier)


def planned_spend(cfg: DictConfig, num_examples: int, noise_multiplier: float, rounds: int | None = None
                  ) -> list[Entry]:
    """Everything one device's utterances will spend over ``rounds`` (default: the run's) at ``noise_multiplier``,
    the normaliser's release included."""
    rounds = int(cfg.rounds) if rounds is None else int(rounds)
    return [*normaliser_release(cfg), *round_spend(cfg, num_examples, noise_multiplier) * rounds]


def sample_level_noise(cfg: DictConfig, num_examples: int) -> float:
    """DP-SGD's noise multiplier on a device holding ``num_examples`` utterances: ``noise_multiplier``, or the one
    that meets ``target_epsilon`` over the planned rounds (raises PrivacyBudgetError if none can)."""
    dp = cfg.privacy.dp_sgd
    target = dp.get("target_epsilon")
    if target is None:
        return float(dp.noise_multiplier)
    ((_, rate, steps),) = round_spend(cfg, num_examples, 1.0)  # the plan, apart from the noise multiplier
    return _calibrated(float(target), float(dp.delta), str(dp.accountant), tuple(normaliser_release(cfg)),
                       rate, steps * int(cfg.rounds), "privacy.dp_sgd.target_epsilon")


def user_level_noise(cfg: DictConfig, sample_rate: float) -> float:
    """The server's user-level noise multiplier: ``noise_multiplier``, or the one that meets ``target_epsilon``
    over the planned rounds at the device sampling rate ``sample_rate`` (m / N)."""
    user = cfg.privacy.user_level
    target = user.get("target_epsilon")
    if target is None:
        return float(user.noise_multiplier)
    return _calibrated(float(target), float(user.delta), str(user.accountant), (), float(sample_rate),
                       int(cfg.rounds), "privacy.user_level.target_epsilon")


@functools.lru_cache(maxsize=256)
def _calibrated(target: float, delta: float, accountant: str, fixed: tuple, rate: float, steps: int,
                who: str) -> float:
    """The noise multiplier of ``(z, rate, steps)`` after the ``fixed`` entries that meets ``target``: one
    bisection per plan and process (a simulation worker serves many devices, each asking every round)."""
    from fl_ser.privacy.accountant import calibrated_noise

    return calibrated_noise(target, delta, lambda z: [*fixed, (z, rate, steps)], accountant, who=who)


def expected_batch(cfg: DictConfig, cohort: int | None) -> float:
    """B, the public number of utterances a distributed round is expected to sum over: the experiment's
    ``privacy.distributed.expected_batch``, else ``utterances_per_device`` x the devices of a round."""
    dist = cfg.privacy.distributed
    if dist.get("expected_batch") is not None:
        return float(dist.expected_batch)
    if cohort is None:
        raise ValueError("distributed DP needs privacy.distributed.expected_batch (the utterances a round sums over, "
                         "a public planning figure) where the device cannot know the number of devices per round")
    return float(dist.utterances_per_device) * int(cohort)


def distributed_settings(cfg: DictConfig, threshold: int, cohort: int | None) -> DistributedDPGD:
    """The experiment's distributed DP-GD (:class:`fl_ser.privacy.distributed.DistributedDPGD`) in a round of
    ``cohort`` devices whose SecAgg+ reconstruction threshold is ``threshold``: the same on every side."""
    from fl_ser.privacy.distributed import DistributedDPGD, contributors_bound

    return DistributedDPGD(sample_level_noise(cfg, 1), float(cfg.privacy.dp_sgd.max_grad_norm),
                           expected_batch(cfg, cohort),
                           contributors_bound(cfg.privacy.distributed.get("min_contributors"), threshold, cohort))
