"""The audited federation, in one process: the devices' own update code and Flower's own server strategies.

An audit needs hundreds of federations (shadow models, canary trials, one run per poisoning setting), far more
than the simulation engine can start in minutes, so it runs the same computation without the messaging:

* each device's contribution is what its ClientApp computes (:meth:`AuditFederation.contribution`): features
  standardised as ``privacy.normalization`` says, local training with :func:`fl_ser.training.train_local`
  (Opacus DP-SGD with the device's own noise multiplier, :func:`clients.client_app.dp_config`), the update
  clipped by :func:`fl_ser.privacy.policy.clip_update`; or, with ``privacy=distributed``, its clipped
  per-utterance gradient sum plus its noise share on SecAgg+'s grid (:func:`fl_ser.privacy.distributed.
  device_share`), decoded to the value SecAgg+ would sum;
* the server combines them as :mod:`server` does: a Flower strategy's own ``aggregate_fit`` on the new weights
  (FedAvg by default; FedMedian, FedTrimmedAvg, Krum and Bulyan for the poisoning audit), user-level Gaussian
  noise on the mean where the experiment asks for it, or, for distributed DP, one DP-GD step on the sum.

No ledger is written and no privacy boundary runs: the audit attacks the arithmetic, not the transport.
``tests/test_audit.py`` checks that these rounds give exactly the simulation engine's checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, Strategy
from omegaconf import DictConfig, OmegaConf

from fl_ser.data.corpus import corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.privacy import normalization
from fl_ser.privacy.accountant import epsilon as accountant_epsilon
from fl_ser.privacy.budget import distributed, distributed_settings, planned_spend, sample_level_noise, uniform_weights
from fl_ser.privacy.noise import add_gaussian
from fl_ser.privacy.policy import clip_update
from fl_ser.task import get_arrays, new_classifier, set_arrays, speaker_data
from fl_ser.training import LocalTrainConfig, train_local

Arrays = list[np.ndarray]


@dataclass(frozen=True)
class Device:
    """One device's data as the audit holds it: raw features (the device standardises them itself)."""

    speaker: str
    sex: str | None
    x: torch.Tensor
    y: torch.Tensor

    def subset(self, index: Sequence[int] | torch.Tensor, name: str | None = None) -> Device:
        index = torch.as_tensor(index, dtype=torch.long)
        return Device(name or self.speaker, self.sex, self.x[index], self.y[index])

    def __len__(self) -> int:
        return len(self.y)


def corpus_devices(cfg: DictConfig, which: str = "train") -> list[Device]:
    """The experiment's training (``train``) or held-out (``test``) speakers, one :class:`Device` each."""
    split = split_from_config(cfg, corpus_from_config(cfg))
    speakers = split.train if which == "train" else split.test
    out = []
    for spk in speakers:
        data = speaker_data(cfg, spk)
        out.append(Device(spk, data.sex, data.x, data.y))
    return out


class _Proxy:
    """The one thing Flower's strategies read from a ClientProxy: its ``cid``."""

    def __init__(self, cid: str):
        self.cid = cid


class AuditFederation:
    """One experiment's devices and server arithmetic, for many in-process federations."""

    def __init__(self, cfg: DictConfig):
        from clients.client_app import dp_config

        self.cfg = cfg
        self.labels = list(cfg.labels)
        self.norm = normalization.from_config(cfg)
        self.train_cfg = LocalTrainConfig(**OmegaConf.to_container(cfg.train))
        self.uniform = uniform_weights(cfg)
        self._dp_config = dp_config
        priv = cfg.privacy
        self.private = bool(priv.dp_sgd.enabled)
        self.distributed = distributed(cfg)
        self.clipping_norm = float(priv.update_clipping.clipping_norm) if priv.update_clipping.enabled else None
        self.user_noise = float(priv.user_level.noise_multiplier) if self.clipping_norm else 0.0
        self._rounds: dict[int, tuple] = {}
        self._template = new_classifier(cfg, len(self.labels))  # built once: building one instantiates the extractor

    # ------------------------------------------------------------------ device side
    def initial(self) -> Arrays:
        return get_arrays(self._template)

    def new_classifier(self, arrays: Arrays) -> torch.nn.Module:
        """The experiment's classifier holding ``arrays`` (a copy of the seeded initial model, then set)."""
        model = copy.deepcopy(self._template)
        set_arrays(model, arrays)
        return model

    def standardised(self, device: Device) -> torch.Tensor:
        """The device's features as it trains on them (its own statistics only with ``normalization=local``)."""
        return self.norm.standardise(device.x)

    def contribution(self, arrays: Arrays, device: Device, cohort: int, x: torch.Tensor | None = None) -> Arrays:
        """What ``device`` sends for the global ``arrays`` in a round of ``cohort`` devices, as an update
        (``new - arrays``; for distributed DP, minus the DP-GD step times its share). ``x``: its standardised
        features, when the caller has them already."""
        x = self.standardised(device) if x is None else x
        classifier = self.new_classifier(arrays)
        if self.distributed:
            from fl_ser.privacy.distributed import device_share

            grid, settings = self.distributed_round(cohort)
            share = grid.decode(device_share(classifier, x, device.y, settings, grid), 1)
            step = float(self.cfg.privacy.distributed.step_size)
            return [(-step * s).astype(a.dtype) for a, s in zip(arrays, share, strict=True)]
        dp = self._dp_config(self.cfg, len(x)) if self.private else None
        train_local(classifier, x, device.y, self.train_cfg, dp=dp)
        new = get_arrays(classifier)
        if self.clipping_norm is not None:
            new = clip_update(new, arrays, self.clipping_norm)
        return [n - a for n, a in zip(new, arrays, strict=True)]

    def distributed_round(self, cohort: int) -> tuple:
        """(SecAgg+'s grid, the devices' DP-GD settings) in a round of ``cohort`` devices, from the server's own
        workflow (:func:`server.secure_aggregation.fit_workflow`): its reconstruction threshold and grid."""
        if cohort not in self._rounds:
            from fl_ser.privacy.distributed import SecAggGrid
            from server.secure_aggregation import fit_workflow

            workflow = fit_workflow(self.cfg, cohort)
            if workflow is None:
                raise ValueError("privacy=distributed needs secure aggregation: the audit of a distributed run "
                                 "takes aggregation=secagg_plus or aggregation=ckks")
            grid = SecAggGrid(float(self.cfg.aggregation.clipping_range), int(workflow.quantization_range))
            self._rounds[cohort] = (grid, distributed_settings(self.cfg, workflow.threshold, cohort))
        return self._rounds[cohort]

    def epsilon(self, num_examples: int, rounds: int, cohort: int) -> float | None:
        """What the ledger of a device with ``num_examples`` utterances records over ``rounds`` rounds of
        ``cohort`` devices: its utterances' epsilon at the experiment's delta (None: no DP, no bound)."""
        if not self.private:
            return None
        cfg = self.cfg
        z = (self.distributed_round(cohort)[1].noise_multiplier if self.distributed
             else sample_level_noise(cfg, num_examples))
        dp = cfg.privacy.dp_sgd
        return accountant_epsilon(planned_spend(cfg, num_examples, z, rounds), float(dp.delta), str(dp.accountant))

    def weight(self, device: Device) -> int:
        return 1 if self.uniform or self.distributed else len(device)

    # ------------------------------------------------------------------ server side
    def aggregate(self, arrays: Arrays, updates: list[Arrays], weights: list[int], server_round: int = 1,
                  strategy: Strategy | None = None) -> Arrays:
        """The next global model from the round's updates: DP-GD on their sum (distributed DP), or the Flower
        strategy's ``aggregate_fit`` over the devices' new weights (FedAvg unless given), then user-level noise
        on the mean where the experiment adds it at the server."""
        if self.distributed:
            return [(a + s).astype(a.dtype) for a, s in zip(arrays, summed(updates), strict=True)]
        strategy = strategy or FedAvg(fit_metrics_aggregation_fn=no_metrics)
        new = [[a + u for a, u in zip(arrays, upd, strict=True)] for upd in updates]
        if self.user_noise > 0:  # server.user_dp.UserLevelDP: uniform mean of the clipped updates, then noise
            weights = [1] * len(new)
        results = [(_Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), int(n), {}))
                   for i, (w, n) in enumerate(zip(new, weights, strict=True))]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        if parameters is None:
            raise RuntimeError(f"{type(strategy).__name__} aggregated nothing from {len(results)} updates")
        out = parameters_to_ndarrays(parameters)
        if self.user_noise > 0:
            out = add_gaussian(out, self.user_noise * self.clipping_norm / len(new))
        return [o.astype(a.dtype) for o, a in zip(out, arrays, strict=True)]

    def run(self, devices: Sequence[Device], rounds: int, start: Arrays | None = None,
            strategy_of: Callable[[], Strategy] | None = None,
            contribute: Callable[[int, int, Device, Arrays, torch.Tensor], Arrays] | None = None,
            observe: Callable[[int, Arrays, list[Arrays]], None] | None = None) -> Arrays:
        """``rounds`` rounds over every device; returns the last global model (the release's weights).

        ``contribute(round, index, device, arrays, x)`` replaces a device's honest contribution (a poisoner's);
        ``observe(round, arrays, updates)`` sees what the server sees before each aggregation (single updates
        under plain aggregation; their sum is all SecAgg+ or CKKS reveals)."""
        arrays = self.initial() if start is None else start
        xs = [self.standardised(d) for d in devices]
        strategy = strategy_of() if strategy_of else None
        for r in range(1, rounds + 1):
            updates = []
            for i, (d, x) in enumerate(zip(devices, xs, strict=True)):
                if contribute is not None:
                    updates.append(contribute(r, i, d, arrays, x))
                else:
                    updates.append(self.contribution(arrays, d, len(devices), x))
            if observe is not None:
                observe(r, arrays, updates)
            arrays = self.aggregate(arrays, updates, [self.weight(d) for d in devices], r, strategy)
        return arrays

    def classifier(self, arrays: Arrays) -> torch.nn.Module:
        return self.new_classifier(arrays).eval()


def summed(updates: list[Arrays]) -> Arrays:
    """The layer-wise sum of several updates: what SecAgg+ or CKKS reveals of a round."""
    return [np.sum(np.stack(layer), axis=0) for layer in zip(*updates, strict=True)]


def no_metrics(_metrics) -> dict:
    """The audit reads no device metrics (and Flower's strategies warn when they have no function for them)."""
    return {}


def flatten(update: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(u, dtype=np.float64).ravel() for u in update])
