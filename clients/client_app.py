"""The Flower ClientApp: one device, one speaker's recordings, which never leave it.

Per round the device loads its own features (extracted once with torchaudio and
cached on its disk), standardises them as ``privacy.normalization`` says
(:mod:`fl_ser.privacy.normalization`), trains the global classifier with Opacus
DP-SGD, records what that spent in its lifetime ledger on its own disk
(:mod:`fl_ser.privacy.ledger`, written before the update leaves), and returns
the new weights. It declines once the next round would take any of its
utterances past its lifetime budget. Around that, in privacy order:

1. the privacy boundary (:func:`fl_ser.privacy.boundary.guard`): every reply,
   errors included, is checked against the list of what may leave; anything
   that goes wrong becomes a fixed public code, the details stay in the
   device's local log;
2. the device's policy guard (:mod:`fl_ser.privacy.policy`): a request weaker
   than the device's own policy is refused before anything is computed;
3. SecAgg+ (:func:`fl_ser.flower_compat.secaggplus_mod`): quantises and masks the final update, refusing
   one that does not fit its quantisation range; or, with ``aggregation=ckks``, :mod:`clients.ckks_mod`:
   encrypts it under the federation's CKKS key (and decrypts only a round's sum);
4. the update mod: clips the update and adds the device's user-level noise
   share, with the settings the guard approved.

Outside all of them, only when the experiment's ``faults`` block injects faults
(tests, rehearsals), :mod:`clients.faults` loses or corrupts replies as a flaky
network or a crashing process would.

After the last round it receives the released model and keeps it in its
versioned model store.

``app`` is the module-level ClientApp the Deployment Engine loads: it reads the
experiment from the run config (:mod:`fl_ser.run_config`); simulation builds the
same app around an in-memory config. Torch is imported only when a message needs
it: three of SecAgg+'s four stages run on the light imports alone.

What a SuperNode's ``--node-config`` may say (all optional except where noted):

* ``partition-id`` and ``num-partitions``: hold this training speaker of the
  experiment's corpus (simulation, lab rehearsals); or ``speaker=ID``;
* ``data-dir``: a participant's own folder of WAV files plus ``labels.csv``
  (real devices; check it first with ``python -m clients.validate``);
* ``device-dir`` (required on a SuperNode): the device's own folder, for its
  privacy ledger (``privacy/``), its policy (``privacy_policy.yaml``), its local
  log (``device.log``), its model store and reports;
* ``policy-file``: the device's privacy policy, if not in ``device-dir``;
* ``cache-dir``: where its feature cache lives (default: ``cache_dir``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fl_ser.protocol import (
    KEY_PROXIMAL_MU,
    KEY_SERVER_ROUND,
    RELEASE_ARTIFACT,
    RELEASE_CONFIG_HASH,
    RELEASE_FILES,
    RELEASE_REPORT,
    RELEASE_ROUND,
    SECURE_AGGREGATIONS,
)
from fl_ser.run_config import decode, encode, experiment_from_run_config

log = logging.getLogger("fl_ser.device")


@dataclass(frozen=True)
class DeviceSetup:
    """What a node's config says about this device: whose recordings it holds and where it keeps things."""

    speaker: str
    ledger_dir: str  # its privacy ledger's folder
    ledger_name: str  # the ledger file's name in that folder
    log_path: str  # its local log: the only place its detailed errors go
    data_dir: str | None = None  # a participant folder; None: a speaker of the experiment's corpus
    device_dir: str | None = None  # model store and reports; None: keep nothing (simulation)
    cache_dir: str | None = None  # feature cache; None: the experiment's cache_dir


def device_setup(cfg: DictConfig, node_config, simulated: bool) -> DeviceSetup:
    """Read this node's config; a misconfigured node gets a message naming the key and the fix."""
    device_dir = str(Path(str(node_config["device-dir"])).expanduser()) if "device-dir" in node_config else None
    cache_dir = str(node_config["cache-dir"]) if "cache-dir" in node_config else None
    if device_dir is None and not simulated:
        raise ValueError("this SuperNode's --node-config has no device-dir=FOLDER: a device keeps its privacy "
                         "ledger, policy and local log there, and never trains without them")
    if "data-dir" in node_config:
        folder = Path(str(node_config["data-dir"])).expanduser()
        speaker, data_dir = str(node_config.get("speaker", folder.name)), str(folder)
    else:
        speaker, data_dir = _corpus_speaker(cfg, node_config), None
    if device_dir is not None:  # a device's own folder: one ledger for whatever recordings it holds
        ledger_dir, name, log_path = str(Path(device_dir) / "privacy"), "ledger", str(Path(device_dir) / "device.log")
    else:  # simulation: one ledger per device in privacy.ledger_dir, named after the data it protects
        source = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True) + f"|{data_dir}"
        name = f"{speaker}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"
        ledger_dir, log_path = str(cfg.privacy.ledger_dir), str(Path(str(cfg.privacy.ledger_dir)) / f"{name}.log")
    return DeviceSetup(speaker, ledger_dir, name, log_path, data_dir, device_dir, cache_dir)


def _corpus_speaker(cfg: DictConfig, node_config) -> str:
    train = _training_speakers(encode(cfg))
    if "speaker" in node_config:
        speaker = str(node_config["speaker"])
        if speaker not in train:
            raise ValueError(f"node config speaker={speaker!r} is not a training speaker of this experiment")
        return speaker
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode's --node-config names no data: give it data-dir=FOLDER (a participant's "
                         "recordings), or partition-id=I num-partitions=N (a speaker of the experiment's corpus)")
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != len(train) or not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} num-partitions={num}, but the experiment has "
                         f"{len(train)} training speakers (one device each): the nodes and the server run "
                         "different data configs")
    return train[pid]


@functools.lru_cache(maxsize=2)
def _training_speakers(cfg_json: str) -> tuple[str, ...]:
    """The experiment's training speakers, worked out once per process: the split walks the whole corpus
    (0.4 s for 10,000 speakers), and a simulation worker serves many devices."""
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config

    cfg = decode(cfg_json)
    return tuple(split_from_config(cfg, corpus_from_config(cfg)).train)


def experiment_cohort(cfg: DictConfig, setup: DeviceSetup) -> int | None:
    """How many devices the experiment puts in each round (None where the device cannot know it)."""
    if cfg.clients_per_round is not None:
        return int(cfg.clients_per_round)
    if cfg.federation.get("num_devices") is not None:
        return int(cfg.federation.num_devices)
    return len(_training_speakers(encode(cfg))) if setup.data_dir is None else None


def policy_of(cfg: DictConfig, setup: DeviceSetup, node_config):
    from fl_ser.privacy.policy import device_policy

    return device_policy(cfg, node_config, setup.device_dir, experiment_cohort(cfg, setup))


@functools.lru_cache(maxsize=8)
def _local_data(cfg_json: str, setup: DeviceSetup):
    from fl_ser.data.loaders import DeviceFolder
    from fl_ser.task import speaker_data

    cfg = decode(cfg_json)
    corpus = None if setup.data_dir is None else DeviceFolder(setup.data_dir, setup.speaker,
                                                              audio=cfg.data.get("audio"))
    return speaker_data(cfg, setup.speaker, corpus=corpus, cache_dir=setup.cache_dir)


def local_data(cfg: DictConfig, setup: DeviceSetup):
    """This device's raw features, labels and utterance ids (extracted once, then from its cache)."""
    return _local_data(encode(cfg), setup)


@functools.lru_cache(maxsize=4)
def _normalization(cfg_json: str):
    from fl_ser.privacy.normalization import from_config

    return from_config(decode(cfg_json))


def normalization(cfg: DictConfig):
    return _normalization(encode(cfg))


def dp_config(cfg: DictConfig, num_examples: int):
    """The device's DP-SGD settings for its ``num_examples`` utterances, or None when sample-level DP is off. With
    ``privacy.dp_sgd.target_epsilon`` the device computes its noise multiplier itself (:mod:`fl_ser.privacy.budget`)."""
    from fl_ser.privacy.budget import sample_level_noise
    from fl_ser.training import DPSGDConfig

    dp = cfg.privacy.dp_sgd
    if not dp.enabled:
        return None
    return DPSGDConfig(noise_multiplier=sample_level_noise(cfg, num_examples), max_grad_norm=float(dp.max_grad_norm),
                       delta=float(dp.delta), epsilon_budget=float(dp.epsilon_budget), accountant=str(dp.accountant),
                       grad_sample_mode=str(dp.grad_sample_mode), poisson_sampling=bool(dp.poisson_sampling),
                       vetted_noise=bool(dp.vetted_noise))


def make_client(cfg: DictConfig, context, simulated: bool = True):
    """Build the NumPyClient for this node (torch and the task are imported here, lazily)."""
    from flwr.client import NumPyClient

    from fl_ser.metrics import classification_report
    from fl_ser.privacy.accountant import check_delta
    from fl_ser.privacy.budget import distributed, uniform_weights
    from fl_ser.privacy.ledger import LifetimeLedger, spend_round
    from fl_ser.task import get_arrays, new_classifier, set_arrays
    from fl_ser.training import LocalTrainConfig, evaluate, planned_entries, train_local

    setup = device_setup(cfg, context.node_config, simulated)
    policy = policy_of(cfg, setup, context.node_config)
    labels = list(cfg.labels)
    num_classes = len(labels)
    private = bool(cfg.privacy.dp_sgd.enabled)
    shares = distributed(cfg)
    norm = normalization(cfg)
    uniform = uniform_weights(cfg)
    train_cfg = LocalTrainConfig(**OmegaConf.to_container(cfg.train))
    ledger = LifetimeLedger(setup.ledger_dir, setup.ledger_name)
    run = str(cfg.get("run_uid") or context.run_id)  # fl-ser's run, the same across a resume

    class EmotionClient(NumPyClient):
        def fit(self, parameters, config):
            data = local_data(cfg, setup)
            classifier = new_classifier(cfg, num_classes)
            set_arrays(classifier, parameters)
            weight = 1 if uniform else len(data.x)
            tcfg = replace(train_cfg, proximal_mu=float(config.get(KEY_PROXIMAL_MU, 0.0)))
            if not private:
                train_local(classifier, norm.standardise(data.x), data.y, tcfg)
                return get_arrays(classifier), weight, {"declined": 0}
            dp = dp_config(cfg, len(data.x))
            policy.check_noise_multiplier(dp.noise_multiplier)
            check_delta(dp.delta, len(data.x), "this device")
            budget = min(dp.epsilon_budget, policy.epsilon_budget or dp.epsilon_budget)
            server_round = int(config.get(KEY_SERVER_ROUND, 0))
            if shares:
                return distributed_round(cfg, context, setup, ledger, data, norm, classifier, dp, budget, run,
                                         server_round)
            planned = planned_entries(len(data.x), tcfg, dp.noise_multiplier)
            with ledger.open() as book:
                metrics = spend_round(book, data, norm, budget, dp.delta, dp.accountant, planned,
                                      lambda x: train_local(classifier, x, data.y, tcfg, dp=dp)["spent"], run,
                                      server_round)
            if metrics["declined"]:
                return parameters, weight, metrics
            return get_arrays(classifier), weight, metrics

        def evaluate(self, parameters, config):
            data = local_data(cfg, setup)
            released = RELEASE_ARTIFACT in config
            report = bool(config.get(RELEASE_REPORT, True)) and policy.device_report
            if released and setup.device_dir is not None:
                keep_release(setup, config, labels, data.x, norm, context.run_id)
            if released and not report:
                if config.get(RELEASE_REPORT, True):
                    log.info("the server asked for this device's accuracy with the release; its policy does not "
                             "allow sending it (device_report: false)")
                return 0.0, 0, {}
            import torch

            classifier = new_classifier(cfg, num_classes)
            set_arrays(classifier, parameters)
            with torch.no_grad():
                x = device_normalizer(norm, data.x)(data.x)
            pred, loss = evaluate(classifier, x, data.y)
            rep = classification_report(data.y.numpy(), pred.numpy(), labels)
            metrics = {"uar": rep["uar"], "accuracy": rep["accuracy"], "num_utterances": len(data.x)}
            if private:
                dp = cfg.privacy.dp_sgd
                with ledger.open() as book:
                    metrics["epsilon"] = book.epsilon(data.ids, float(dp.delta), str(dp.accountant))
            if released and setup.device_dir is not None:
                update_report(setup, metrics)
            return loss, len(data.x), metrics

    return EmotionClient().to_client()


def distributed_round(cfg: DictConfig, context, setup: DeviceSetup, ledger, data, norm, classifier, dp, budget: float,
                      run: str, server_round: int):
    """One round of distributed DP-GD (:mod:`fl_ser.privacy.distributed`): the device's noisy, clipped gradient
    sum on SecAgg+'s grid, its spend recorded first. A device that declines (budget spent) still sends a share of
    pure noise, which depends on no data and costs nothing, so the sum keeps the noise it was calibrated for."""
    from fl_ser.privacy.budget import distributed_settings
    from fl_ser.privacy.distributed import SecAggGrid, device_share, noise_share
    from fl_ser.privacy.ledger import spend_round

    if cfg.aggregation.name == "ckks":  # the grid from the device's own config; SecAgg+'s from its setup stage
        from clients.ckks_mod import grid_settings

        clipping_range, quantization_range, threshold = grid_settings(cfg)
    else:
        from fl_ser.flower_compat import secagg_round_settings

        clipping_range, quantization_range, threshold = secagg_round_settings(context)
    grid = SecAggGrid(clipping_range, quantization_range)
    settings = distributed_settings(cfg, threshold, experiment_cohort(cfg, setup))
    share: list = []

    def train(x):
        share.extend(device_share(classifier, x, data.y, settings, grid))
        return settings.round_entries()

    with ledger.open() as book:
        metrics = spend_round(book, data, norm, budget, dp.delta, dp.accountant, settings.round_entries(), train,
                              run, server_round, local=settings.local_round_entries())
    if metrics["declined"]:
        share = noise_share([tuple(p.shape) for p in classifier.parameters()], settings, grid)
    return share, 1, metrics


def device_normalizer(norm, x):
    """How the device standardises its own recordings for inference: with a speaker-level mode, its own exact
    statistics (nothing leaves the device, so no noise is needed); otherwise exactly as in training."""
    from fl_ser.features.normalize import FeatureNormalizer

    if norm.mode in ("dp", "local"):
        return FeatureNormalizer(norm.shape, norm.kind, bound=norm.bound).fit(x)
    return norm.module(x)


def keep_release(setup: DeviceSetup, config, labels: list[str], features, norm, run_id: int) -> None:
    """Keep the release in this device's model store and, for speaker-level normalisation, adapt it to the device.

    The release's files (every model format, its config) are stored exactly as released. With
    ``privacy.normalization.mode`` dp or local the device trained on its own statistics, so a second version
    has its normaliser refitted on this device's raw, unlabelled ``features``: the version ``clients.predict``
    uses by default. All local.
    """
    from clients.model_store import ModelStore
    from clients.personalise import adapt_normaliser

    store = ModelStore(Path(setup.device_dir) / "model_store")
    files = {name: bytes(config[key]) for name, key in RELEASE_FILES.items() if key in config}
    released = store.add(files, labels,
                         {"round": int(config[RELEASE_ROUND]), "config_hash": str(config[RELEASE_CONFIG_HASH]),
                          "run_id": int(run_id), "speaker": setup.speaker})
    adapted = adapt_normaliser(store, released.version, features) if norm.mode in ("dp", "local") else released
    report = {"speaker": setup.speaker, "store": str(store.root), "released_version": released.version,
              "version": adapted.version, "round": int(config[RELEASE_ROUND]), "global_model_on_own_data": {}}
    (Path(setup.device_dir) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("stored release round %s as model version %s (for use: %s)", report["round"], released.version,
             adapted.version)


def update_report(setup: DeviceSetup, metrics: dict) -> None:
    path = Path(setup.device_dir) / "report.json"
    report = json.loads(path.read_text())
    report["global_model_on_own_data"] = metrics
    path.write_text(json.dumps(report, indent=2) + "\n")


def privacy_mods(cfg: DictConfig, setup: DeviceSetup, simulated: bool) -> list:
    """The mods inside the boundary, in privacy order: policy guard, SecAgg+ or CKKS, update clipping and noise
    share."""
    from fl_ser.privacy.policy import make_policy_mods

    guard_mod, update_mod = make_policy_mods(lambda ctxt: (policy_of(cfg, setup, ctxt.node_config), cfg))
    mods = [guard_mod]
    if cfg.aggregation.name == "secagg_plus":
        from fl_ser.flower_compat import secaggplus_mod

        mods.append(secaggplus_mod)
    if cfg.aggregation.name == "ckks":
        from clients.ckks_mod import device_key, make_ckks_mod

        mods.append(make_ckks_mod(lambda ctxt: device_key(cfg, ctxt.node_config, setup.device_dir, simulated),
                                  lambda ctxt: (cfg, experiment_cohort(cfg, setup))))
    mods.append(update_mod)
    return mods


def build_client_app(cfg: DictConfig | None = None):
    """The ClientApp for an experiment: ``cfg`` in simulation, or (None) the one each run's config carries.

    The app holds ``cfg`` as JSON, parsed once per worker process: the simulation engine ships the ClientApp
    with every message, and a DictConfig costs ~1.7 ms a message to pickle and unpickle, a JSON string next
    to nothing. Its one mod is the device itself: the privacy boundary around everything else."""
    from flwr.client import ClientApp
    from flwr.client.mod.utils import make_ffn

    from clients.faults import fault_mods
    from fl_ser.privacy.boundary import guard, local_log
    from fl_ser.privacy.budget import uniform_weights

    text = None if cfg is None else encode(cfg)
    simulated = cfg is not None

    def resolve(context) -> tuple[DictConfig, DeviceSetup]:
        exp = decode(text) if text is not None else experiment_from_run_config(context.run_config)
        return exp, device_setup(exp, context.node_config, simulated)

    def device_mod(msg, context, call_next):
        try:
            log_path = Path(resolve(context)[1].log_path)
        except Exception:  # reported from inside the boundary below, as a public code
            log_path = None

        def handle():
            exp, setup = resolve(context)
            return make_ffn(call_next, privacy_mods(exp, setup, simulated))(msg, context)

        def setting(read):
            return lambda: read(resolve(context)[0])

        with local_log(log_path):
            return guard(msg, context, handle,
                         secure_aggregation=setting(lambda c: c.aggregation.name in SECURE_AGGREGATIONS),
                         uniform_weight=setting(uniform_weights),
                         audit_dir=setting(lambda c: c.privacy.get("audit_dir")))

    return ClientApp(client_fn=lambda context: make_client(resolve(context)[0], context, simulated),
                     mods=[*fault_mods(cfg, resolve), device_mod])  # faults: the network's, outside the device


app = build_client_app()
