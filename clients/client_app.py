"""The Flower ClientApp: one device, one speaker's recordings, which never leave it.

Per round the device loads its own features (extracted once with torchaudio and
cached on its disk), standardises them with its own statistics, trains the
global classifier with Opacus DP-SGD, and returns the new weights. The mods
then clip the update, optionally add its share of user-level noise, and mask
it for SecAgg+; the privacy boundary checks every reply. The device's privacy
ledger lives in ``context.state`` so its epsilon composes across rounds, and it
declines to train once the next round would exceed its budget.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fl_ser.device")

LEDGER_RECORD = "fl-ser.privacy"


def device_speaker(cfg: DictConfig, node_config) -> str:
    """Which training speaker this node holds: its partition id in simulation, or node config in deployment."""
    from fl_ser.task import corpus_from_config, split_from_config

    split = split_from_config(cfg, corpus_from_config(cfg))
    if "speaker" in node_config:
        speaker = str(node_config["speaker"])
        if speaker not in split.train:
            raise ValueError(f"node config speaker={speaker!r} is not a training speaker of this experiment")
        return speaker
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != len(split.train):
        raise ValueError(f"the federation has {num} nodes but the experiment has {len(split.train)} training "
                         "speakers (one device each): the nodes and the server run different data configs")
    return split.train[pid]


@functools.lru_cache(maxsize=8)
def _local_data(cfg_json: str, speaker: str):
    import torch

    from fl_ser.task import fitted_normalizer, speaker_data

    cfg = OmegaConf.create(json.loads(cfg_json))
    data = speaker_data(cfg, speaker)
    with torch.no_grad():
        return fitted_normalizer(cfg, data.x)(data.x), data.y


def local_data(cfg: DictConfig, speaker: str):
    """This device's features, standardised with its own statistics (cached in memory and on its disk)."""
    return _local_data(json.dumps(OmegaConf.to_container(cfg), sort_keys=True), speaker)


def dp_config(cfg: DictConfig):
    """The device's DP-SGD settings, or None when sample-level DP is off."""
    from fl_ser.training import DPSGDConfig

    dp = cfg.privacy.dp_sgd
    if not dp.enabled:
        return None
    return DPSGDConfig(noise_multiplier=float(dp.noise_multiplier), max_grad_norm=float(dp.max_grad_norm),
                       delta=float(dp.delta), epsilon_budget=float(dp.epsilon_budget), accountant=str(dp.accountant),
                       grad_sample_mode=str(dp.grad_sample_mode), poisson_sampling=bool(dp.poisson_sampling))


def check_secagg_range(arrays, weight: float, max_weight: float, clipping_range: float) -> None:
    """SecAgg+ silently clips weighted values to +-clipping_range before quantising; refuse instead of corrupting."""
    peak = max(float(abs(a).max()) for a in arrays) * weight / max_weight
    if peak > 0.9 * clipping_range or weight > max_weight:
        raise ValueError(
            f"the update does not fit SecAgg+'s quantisation range: weighted peak {peak:.3g} vs clipping_range "
            f"{clipping_range} (weight {weight}, max_weight {max_weight}). Raise aggregation.clipping_range "
            f"(and aggregation.max_weight if the weight exceeds it), or clip updates with privacy=full.")


def make_client(cfg: DictConfig, context):
    """Build the NumPyClient for this node (torch and the task are imported here, lazily)."""
    from flwr.app import ConfigRecord
    from flwr.client import NumPyClient

    from fl_ser.metrics import classification_report
    from fl_ser.privacy.accountant import PrivacyLedger, check_delta
    from fl_ser.task import get_arrays, new_classifier, set_arrays
    from fl_ser.training import LocalTrainConfig, evaluate, planned_epsilon, train_local

    speaker = device_speaker(cfg, context.node_config)
    labels = list(cfg.labels)
    num_classes = len(labels)
    dp = dp_config(cfg)
    uniform = bool(cfg.privacy.update_clipping.enabled)
    secure = cfg.aggregation.name == "secagg_plus"
    train_cfg = LocalTrainConfig(**OmegaConf.to_container(cfg.train))

    def ledger() -> PrivacyLedger:
        rec = context.state.config_records.get(LEDGER_RECORD)
        mech = str(cfg.privacy.dp_sgd.accountant)
        return PrivacyLedger.from_json(str(rec["ledger"])) if rec else PrivacyLedger(mech)

    class EmotionClient(NumPyClient):
        def fit(self, parameters, config):
            x, y = local_data(cfg, speaker)
            classifier = new_classifier(cfg, num_classes)
            set_arrays(classifier, parameters)
            weight = 1 if uniform else len(x)
            tcfg = replace(train_cfg, proximal_mu=float(config.get("proximal_mu", 0.0)))
            metrics = {"declined": 0}
            if dp is None:
                train_local(classifier, x, y, tcfg)
            else:
                book = ledger()
                check_delta(dp.delta, len(x), f"device {speaker}")
                after = planned_epsilon(book, len(x), tcfg, dp)
                if after > dp.epsilon_budget:
                    log.warning("device %s declines round %s: training would raise its epsilon from %.2f to %.2f, "
                                "over its budget %.2f (privacy.dp_sgd.epsilon_budget)", speaker,
                                config.get("server_round"), book.epsilon(dp.delta), after, dp.epsilon_budget)
                    return parameters, weight, {"declined": 1, "epsilon": book.epsilon(dp.delta)}
                train_local(classifier, x, y, tcfg, dp=dp, ledger=book)
                context.state.config_records[LEDGER_RECORD] = ConfigRecord({"ledger": book.to_json()})
                metrics["epsilon"] = book.epsilon(dp.delta)
            arrays = get_arrays(classifier)
            if secure:
                check_secagg_range(arrays, weight, float(cfg.aggregation.max_weight) if not uniform else 1.0,
                                   float(cfg.aggregation.clipping_range))
            return arrays, weight, metrics

        def evaluate(self, parameters, config):
            x, y = local_data(cfg, speaker)
            classifier = new_classifier(cfg, num_classes)
            set_arrays(classifier, parameters)
            pred, loss = evaluate(classifier, x, y)
            rep = classification_report(y.numpy(), pred.numpy(), labels)
            metrics = {"uar": rep["uar"], "accuracy": rep["accuracy"], "num_utterances": len(x)}
            if dp is not None:
                metrics["epsilon"] = ledger().epsilon(dp.delta)
            return loss, len(x), metrics

    return EmotionClient().to_client()


def build_client_app(cfg: DictConfig):
    """The ClientApp for a resolved experiment config, with its mods in privacy order."""
    from flwr.client import ClientApp
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod

    from clients.mods import distributed_noise_mod
    from fl_ser.privacy.boundary import make_boundary_mod

    secure = cfg.aggregation.name == "secagg_plus"
    audit = cfg.privacy.get("audit_dir")
    mods = [make_boundary_mod(secure, audit)]
    if secure:
        mods.append(secaggplus_mod)
    if cfg.privacy.user_level.noise_multiplier > 0 and cfg.privacy.user_level.placement == "distributed":
        mods.append(distributed_noise_mod)
    if cfg.privacy.update_clipping.enabled:
        mods.append(fixedclipping_mod)
    return ClientApp(client_fn=lambda context: make_client(cfg, context), mods=mods)

