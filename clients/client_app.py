"""The Flower ClientApp: one device, one speaker's recordings, which never leave it.

Per round the device loads its own features (extracted once with torchaudio and
cached on its disk), standardises them with its own statistics, trains the
global classifier with Opacus DP-SGD, and returns the new weights. The mods
then clip the update, optionally add its share of user-level noise, and mask
it for SecAgg+; the privacy boundary checks every reply. The device's privacy
ledger lives in ``context.state`` so its epsilon composes across rounds, and it
declines to train once the next round would exceed its budget. After the last
round it receives the released model and keeps it in its versioned model store.

``app`` is the module-level ClientApp the Deployment Engine loads: it reads the
experiment from the run config (:mod:`fl_ser.run_config`); simulation builds the
same app around an in-memory config. Torch is imported only when a message needs
it: three of SecAgg+'s four stages run on the light imports alone.

What a SuperNode's ``--node-config`` may say (all optional except where noted):

* ``partition-id`` and ``num-partitions``: hold this training speaker of the
  experiment's corpus (simulation, lab rehearsals); or ``speaker=ID``;
* ``data-dir``: a participant's own folder of WAV files plus ``labels.csv``
  (real devices; check it first with ``python -m clients.validate``);
* ``device-dir``: the device's own folder for its model store and reports;
* ``cache-dir``: where its feature cache lives (default: ``cache_dir``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fl_ser.run_config import decode, encode, experiment_from_run_config

log = logging.getLogger("fl_ser.device")

LEDGER_RECORD = "fl-ser.privacy"
# Evaluate-config keys of the release message (server/release.py sends them after the last round).
RELEASE_ARTIFACT = "fl-ser.release.artifact"
RELEASE_ROUND = "fl-ser.release.round"
RELEASE_CONFIG_HASH = "fl-ser.release.config_hash"
RELEASE_REPORT = "fl-ser.release.report"  # False: store the release, send no metrics back


@dataclass(frozen=True)
class DeviceSetup:
    """What a node's config says about this device: whose recordings it holds and where it keeps things."""

    speaker: str
    data_dir: str | None = None  # a participant folder; None: a speaker of the experiment's corpus
    device_dir: str | None = None  # model store and reports; None: keep nothing (simulation)
    cache_dir: str | None = None  # feature cache; None: the experiment's cache_dir


def device_setup(cfg: DictConfig, node_config) -> DeviceSetup:
    """Read this node's config; a misconfigured node gets a message naming the key and the fix."""
    paths = {field: str(node_config[key]) if key in node_config else None
             for key, field in (("device-dir", "device_dir"), ("cache-dir", "cache_dir"))}
    if "data-dir" in node_config:
        folder = Path(str(node_config["data-dir"])).expanduser()
        return DeviceSetup(str(node_config.get("speaker", folder.name)), str(folder), **paths)
    train = _training_speakers(encode(cfg))
    if "speaker" in node_config:
        speaker = str(node_config["speaker"])
        if speaker not in train:
            raise ValueError(f"node config speaker={speaker!r} is not a training speaker of this experiment")
        return DeviceSetup(speaker, **paths)
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode's --node-config names no data: give it data-dir=FOLDER (a participant's "
                         "recordings), or partition-id=I num-partitions=N (a speaker of the experiment's corpus)")
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != len(train) or not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} num-partitions={num}, but the experiment has "
                         f"{len(train)} training speakers (one device each): the nodes and the server run "
                         "different data configs")
    return DeviceSetup(train[pid], **paths)


@functools.lru_cache(maxsize=2)
def _training_speakers(cfg_json: str) -> tuple[str, ...]:
    """The experiment's training speakers, worked out once per process: the split walks the whole corpus
    (0.4 s for 10,000 speakers), and a simulation worker serves many devices."""
    from fl_ser.task import corpus_from_config, split_from_config

    cfg = decode(cfg_json)
    return tuple(split_from_config(cfg, corpus_from_config(cfg)).train)


@functools.lru_cache(maxsize=8)
def _local_data(cfg_json: str, setup: DeviceSetup):
    import torch

    from fl_ser.data.loaders import DeviceFolder
    from fl_ser.task import fitted_normalizer, speaker_data

    cfg = decode(cfg_json)
    corpus = None if setup.data_dir is None else DeviceFolder(setup.data_dir, setup.speaker)
    data = speaker_data(cfg, setup.speaker, corpus=corpus, cache_dir=setup.cache_dir)
    with torch.no_grad():
        return fitted_normalizer(cfg, data.x)(data.x), data.y, data.x


def local_data(cfg: DictConfig, setup: DeviceSetup):
    """This device's features standardised with its own statistics, its labels, and the raw features (cached)."""
    return _local_data(encode(cfg), setup)


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

    setup = device_setup(cfg, context.node_config)
    speaker = setup.speaker
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
            x, y, _ = local_data(cfg, setup)
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
            if RELEASE_ARTIFACT in config and not config.get(RELEASE_REPORT, True):
                if setup.device_dir is not None:
                    keep_release(setup, config, labels, local_data(cfg, setup)[2], {}, context.run_id)
                return 0.0, 0, {}
            x, y, raw = local_data(cfg, setup)
            classifier = new_classifier(cfg, num_classes)
            set_arrays(classifier, parameters)
            pred, loss = evaluate(classifier, x, y)
            rep = classification_report(y.numpy(), pred.numpy(), labels)
            metrics = {"uar": rep["uar"], "accuracy": rep["accuracy"], "num_utterances": len(x)}
            if dp is not None:
                metrics["epsilon"] = ledger().epsilon(dp.delta)
            if RELEASE_ARTIFACT in config and setup.device_dir is not None:
                keep_release(setup, config, labels, raw, metrics, context.run_id)
            return loss, len(x), metrics

    return EmotionClient().to_client()


def keep_release(setup: DeviceSetup, config, labels: list[str], features, metrics: dict, run_id: int) -> None:
    """Keep the release in this device's model store, adapt it to the device, and write the device's report.

    Two versions are stored: the artifact exactly as released, then the same model with its normaliser
    refitted on this device's own features (``features``: raw, unlabelled), which is how the device used
    the global classifier in training and the version ``clients.predict`` uses by default. All local.
    """
    from clients.model_store import ModelStore
    from clients.personalise import adapt_normaliser

    store = ModelStore(Path(setup.device_dir) / "model_store")
    released = store.add(bytes(config[RELEASE_ARTIFACT]), labels,
                         {"round": int(config[RELEASE_ROUND]), "config_hash": str(config[RELEASE_CONFIG_HASH]),
                          "run_id": int(run_id), "speaker": setup.speaker})
    adapted = adapt_normaliser(store, released.version, features)
    report = {"speaker": setup.speaker, "store": str(store.root), "released_version": released.version,
              "version": adapted.version, "round": int(config[RELEASE_ROUND]),
              "global_model_on_own_data": metrics}
    (Path(setup.device_dir) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("device %s stored release round %s as model version %s (adapted: %s)", setup.speaker,
             report["round"], released.version, adapted.version)


def privacy_mods(cfg: DictConfig) -> list:
    """The ClientApp mods in privacy order: boundary (outermost), SecAgg+, distributed noise, update clipping."""
    from flwr.client.mod import fixedclipping_mod

    from clients.mods import distributed_noise_mod, secure_aggregation_mod
    from fl_ser.privacy.boundary import make_boundary_mod

    secure = cfg.aggregation.name == "secagg_plus"
    mods = [make_boundary_mod(secure, cfg.privacy.get("audit_dir"))]
    if secure:
        mods.append(secure_aggregation_mod)
    if cfg.privacy.user_level.noise_multiplier > 0 and cfg.privacy.user_level.placement == "distributed":
        mods.append(distributed_noise_mod)
    if cfg.privacy.update_clipping.enabled:
        mods.append(fixedclipping_mod)
    return mods


def build_client_app(cfg: DictConfig | None = None):
    """The ClientApp for an experiment: ``cfg`` in simulation, or (None) the one each run's config carries.

    The app holds ``cfg`` as JSON, parsed once per worker process: the simulation engine ships the ClientApp
    with every message, and a DictConfig costs ~1.7 ms a message to pickle and unpickle, a JSON string next
    to nothing."""
    from flwr.client import ClientApp
    from flwr.client.mod.utils import make_ffn

    text = None if cfg is None else encode(cfg)

    def experiment(context) -> DictConfig:
        return decode(text) if text is not None else experiment_from_run_config(context.run_config)

    def configured_mods(msg, context, call_next):
        return make_ffn(call_next, privacy_mods(experiment(context)))(msg, context)

    return ClientApp(client_fn=lambda context: make_client(experiment(context), context), mods=[configured_mods])


app = build_client_app()
