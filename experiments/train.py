"""Run one federated experiment from the Hydra config: ``python -m experiments.train [overrides]``.

Resolves the config once (filling the label set from the corpus), checks it
(model vs features, privacy budget, federation size) before any process starts,
writes it to ``<run dir>/config.yaml``, runs the Flower ServerApp and ClientApps
on the simulation engine (``federation=simulation``) or submits them to a
SuperLink (``federation=deployment``, see :mod:`experiments.deployment`), and
prints the summary. Outputs land in the Hydra run
dir (``hydra.run.dir=DIR`` is respected); a run dir that already holds a run is
refused, never overwritten.

``python -m experiments.train resume=RUN_DIR`` continues a run that was killed or
stopped, from its last completed round, with the run dir's own ``config.yaml``
(:func:`resumed`): only operational settings (:data:`RESUMABLE`) may be
overridden. The server's state comes from ``checkpoints/state.npz``
(:mod:`server.checkpoint`), the devices' spending from their own ledgers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fl_ser")


class ConfigError(ValueError):
    """The experiment config cannot run as written; the message names the setting and the fix."""


def prepare(cfg: DictConfig) -> DictConfig:
    """Resolve and check the config; returns a plain, fully resolved copy with ``labels`` filled in."""
    from clients.faults import FaultConfigError, FaultPlan
    from fl_ser.data.corpus import CorpusError, corpus_from_config
    from fl_ser.data.partition import split_from_config
    from fl_ser.models.classifiers import build_classifier
    from fl_ser.privacy.accountant import PrivacyBudgetError
    from fl_ser.task import extractor_from_config
    from server import pretrain

    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except Exception as err:  # MissingMandatoryValue and friends
        if str(getattr(err, "full_key", "")).startswith("pretrain."):
            raise ConfigError(f"{err}. A pre-training corpus other than the synthetic one needs a path, e.g. "
                              "`pretrain=emodb pretrain.corpus.root=/path/to/emodb`.") from None
        raise ConfigError(f"{err}. Corpora other than the synthetic one need a path, e.g. `data=emodb "
                          "data.root=/path/to/emodb` or `data=manifest data.manifest=/path/to/list.csv`.") from None
    try:
        corpus = corpus_from_config(resolved)
        split = split_from_config(resolved, corpus)
    except (CorpusError, InstantiationException) as err:  # Hydra wraps the loader's own error
        raise ConfigError(str(err.__cause__ or err)) from err
    if resolved.get("labels") and list(resolved.labels) != list(corpus.emotions):  # a resumed run's config
        raise ConfigError(f"the corpus now has the emotions {list(corpus.emotions)}, but the run was started with "
                          f"{list(resolved.labels)}: its data changed, so it cannot be resumed; start a new run")
    resolved.labels = list(corpus.emotions)
    if not resolved.get("run_uid"):
        resolved.run_uid = uuid.uuid4().hex[:16]
    try:
        FaultPlan.from_config(resolved.get("faults"))  # a bad fault-injection block fails here, not on a device
    except FaultConfigError as err:
        raise ConfigError(str(err)) from None
    ext = extractor_from_config(resolved)
    try:
        build_classifier(resolved.model, ext.output_shape, ext.kind, len(corpus.emotions))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        check_privacy(resolved, corpus, split)
    except PrivacyBudgetError as err:
        raise ConfigError(str(err)) from err
    try:
        pretrain.check(resolved, corpus)  # public pre-training must not touch the devices' data
    except (pretrain.PretrainError, CorpusError, InstantiationException) as err:
        raise ConfigError(str(err.__cause__ or err)) from err
    return resolved


#: Settings a resumed run may change: how and where it runs, never what it computes or spends.
RESUMABLE = ("verbose", "federation.num_cpus", "federation.client_cpus", "federation.ray_address",
             "federation.reply_timeout_s", "federation.poll_interval_s", "federation.run_timeout_s",
             "federation.superlink", "federation.root_certificates", "federation.max_empty_rounds")


def override_key(override: str) -> str:
    """The config key a command-line override sets (``+key=v``, ``~key`` and ``key=v`` alike)."""
    return override.split("=", 1)[0].lstrip("+~")


def resumed(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of the run in ``cfg.resume``, checked again, with the operational ``overrides`` applied; any
    other override is refused, as is a run dir that holds no run or a finished one."""
    from server.records import earlier_results

    run_dir = Path(str(cfg.resume)).expanduser()
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: {stored_path} does not exist, so this is not an fl-ser run dir. "
                          "Give the dir a run printed when it started (`... -> DIR`).")
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status", "completed") == "completed":
        raise ConfigError(f"resume={cfg.resume}: that run completed (see {summary}); nothing to resume. Start a new "
                          "run in a new dir for more rounds.")
    keys = [override_key(o) for o in overrides]
    refused = [k for k in keys if k not in RESUMABLE and k != "resume" and not k.startswith("hydra.")]
    if refused:
        raise ConfigError(f"resume continues the run exactly as {stored_path} describes; overriding "
                          f"{', '.join(refused)} would change the experiment. Only these may change: "
                          f"{', '.join(RESUMABLE)}. For a different experiment start a new run in a new dir.")
    stored = OmegaConf.load(stored_path)
    if Path(str(stored.run_dir)).resolve() != run_dir.resolve():
        raise ConfigError(f"resume={cfg.resume}: the run was started in {stored.run_dir} and its devices' ledgers "
                          "and paths refer to it; resume it from where it was started (same working directory).")
    for key in keys:
        if key in RESUMABLE:
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), force_add=True)
    stored.resume = str(run_dir.resolve())
    if not earlier_results(run_dir):
        log.warning("%s holds no completed round yet: the run starts again from round 1", run_dir)
    return prepare(stored)


def check_privacy(cfg: DictConfig, corpus, split) -> None:
    """Catch impossible budgets and unsound settings before launching: every device must be able to train at
    least one round, normaliser release included, and the normalisation must keep the stated guarantee."""
    from fl_ser.privacy import normalization
    from fl_ser.privacy.accountant import PrivacyBudgetError, check_delta, epsilon
    from fl_ser.privacy.budget import distributed, planned_spend
    from fl_ser.training import LocalTrainConfig
    from server.server_app import clients_per_round

    priv = cfg.privacy
    m = clients_per_round(cfg, len(split.train))
    warn_speaker_statistics(cfg, corpus, split)
    user_noise = priv.user_level.noise_multiplier > 0 or priv.user_level.get("target_epsilon") is not None
    if user_noise and distributed(cfg):
        raise PrivacyBudgetError("privacy=distributed sends each device's noisy gradient sum, not a model update, so "
                                 "there is no update to add user-level noise to: use privacy=full for user-level DP")
    if user_noise and not priv.update_clipping.enabled:
        raise PrivacyBudgetError("user-level noise needs clipped updates (their sensitivity); set "
                                 "privacy.update_clipping.enabled=true or privacy.user_level.noise_multiplier=0")
    if priv.user_level.get("target_epsilon") is not None and str(priv.user_level.placement) == "distributed":
        raise PrivacyBudgetError("privacy.user_level.target_epsilon is met by the server's noise; with "
                                 "placement=distributed each device checks its share against a noise multiplier it "
                                 "knows, so give privacy.user_level.noise_multiplier instead")
    normalization.from_config(cfg)  # checks the mode; computes (and caches) the public reference once
    if cfg.aggregation.name == "ckks":  # its parameters and how many updates a sum must hold, before anything runs
        from server.secure_aggregation import fit_workflow

        fit_workflow(cfg, m)
    if not priv.dp_sgd.enabled:
        return
    from clients.client_app import dp_config

    smallest = min(split.train, key=lambda s: len(corpus.utterances_of(s)))
    n = len(corpus.utterances_of(smallest))
    dp = dp_config(cfg, n)
    if priv.dp_sgd.get("target_epsilon") is not None:
        log.info("target epsilon %s over %s rounds: noise multiplier %.4f (device %s, %d utterances)",
                 priv.dp_sgd.target_epsilon, cfg.rounds, dp.noise_multiplier, smallest, n)
    if distributed(cfg):
        check_distributed(cfg, m)
    train = LocalTrainConfig(**OmegaConf.to_container(cfg.train))
    check_delta(dp.delta, n, f"device {smallest} ({n} utterances)")
    first = epsilon(planned_spend(cfg, n, dp.noise_multiplier, rounds=1), dp.delta, dp.accountant)
    if first > dp.epsilon_budget:
        raise PrivacyBudgetError(
            f"impossible privacy budget: the normaliser release and one round of DP-SGD on device {smallest} ({n} "
            f"utterances, {train.epochs} epochs, batch {train.batch_size or 'all'}, noise_multiplier "
            f"{dp.noise_multiplier}) already spend epsilon {first:.2f} > privacy.dp_sgd.epsilon_budget="
            f"{dp.epsilon_budget}. Raise the budget or the noise multipliers, or lower train.epochs / "
            "train.batch_size.")
    expected = round(cfg.rounds * m / len(split.train))
    total = epsilon(planned_spend(cfg, n, dp.noise_multiplier, rounds=expected), dp.delta, dp.accountant)
    if total > dp.epsilon_budget:
        log.warning("device %s would reach epsilon %.2f over %d rounds (> budget %.2f): devices will decline to "
                    "train once their budget is spent", smallest, total, expected, dp.epsilon_budget)


def warn_speaker_statistics(cfg: DictConfig, corpus, split) -> None:
    """Per-speaker statistics (``local``) subtract a speaker's mean: where most speakers express one or two
    emotions, that mean is the emotion itself (an uneven synthetic federation: UAR 0.365 with them, 0.554 with
    public statistics; RESULTS.md). Say so before the run, from the corpus's labels alone."""
    if str(cfg.privacy.normalization.mode) != "local":
        return
    covered = sorted(len({u.emotion for u in corpus.utterances_of(s)}) for s in split.train)
    median = covered[len(covered) // 2]
    if 2 * median < len(corpus.emotions):
        log.warning("privacy.normalization.mode=local standardises each device with its own statistics, but the "
                    "median training speaker expresses %d of the %d emotions: its mean is mostly its emotion, which "
                    "the normaliser then removes. Use privacy.normalization.mode=public (RESULTS.md, uneven "
                    "federations).", median, len(corpus.emotions))


def check_distributed(cfg: DictConfig, cohort: int) -> None:
    """Distributed DP needs SecAgg+ (or CKKS) on a power-of-two grid fine enough for its noise shares, and no update
    clipping on the shares (user-level noise is refused earlier, in :func:`check_privacy`)."""
    from fl_ser.privacy.accountant import PrivacyBudgetError
    from fl_ser.privacy.budget import distributed_settings
    from fl_ser.privacy.distributed import SecAggGrid
    from fl_ser.privacy.noise import MIN_STEPS_PER_STD
    from fl_ser.task import new_classifier
    from server.secure_aggregation import fit_workflow

    if cfg.aggregation.name not in ("secagg_plus", "ckks"):
        raise PrivacyBudgetError("privacy.dp_sgd.placement=distributed adds only a share of the noise on each device: "
                                 "it needs aggregation=secagg_plus (or ckks), so that the server sees nothing but "
                                 "the sum")
    if cfg.privacy.update_clipping.enabled:
        raise PrivacyBudgetError("privacy.dp_sgd.placement=distributed sends each device's noisy gradient sum, not "
                                 "a model update: set privacy.update_clipping.enabled=false (privacy=distributed does)")
    secure = fit_workflow(cfg, cohort)
    grid = SecAggGrid(float(cfg.aggregation.clipping_range), secure.quantization_range)
    settings = distributed_settings(cfg, secure.threshold, cohort)
    params = sum(p.numel() for p in new_classifier(cfg, len(cfg.labels)).parameters())
    std = settings.share_std(params, grid.step)
    if std < MIN_STEPS_PER_STD * grid.step:
        raise PrivacyBudgetError(f"each device's noise share (std {std:.3g}) is coarser than SecAgg+'s grid allows "
                                 f"({MIN_STEPS_PER_STD} steps of {grid.step:.3g}); lower aggregation.clipping_range")
    log.info("distributed DP-GD: z=%.4f against the aggregator (>= %d shares in every sum), z=%.4f per share; "
             "B=%g utterances, grid %.3g, share std %.4g", settings.noise_multiplier, settings.min_contributors,
             settings.local_noise_multiplier, settings.expected_batch, grid.step, std)


def simulate(cfg: DictConfig) -> dict:
    """Run the ServerApp and one ClientApp per training speaker on Flower's simulation engine (Ray)."""
    from clients.client_app import build_client_app
    from experiments.simulation import run_simulation
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from server.server_app import build_server_app

    num_devices = len(split_from_config(cfg, corpus_from_config(cfg)).train)
    fed = cfg.federation
    init_args = {"include_dashboard": False, "log_to_driver": bool(cfg.verbose),
                 "logging_level": logging.INFO if cfg.verbose else logging.WARNING}
    if fed.ray_address:
        init_args["address"] = str(fed.ray_address)
    else:
        init_args["num_cpus"] = int(fed.num_cpus or os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": float(fed.client_cpus), "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=build_server_app(cfg), client_app=build_client_app(cfg), num_supernodes=num_devices,
                   backend_config=backend, verbose=bool(cfg.verbose))
    return json.loads((Path(cfg.run_dir) / "summary.json").read_text())


def quiet_console() -> None:
    """Keep libraries' INFO chatter out of the console (it still goes to the run dir's log file)."""
    import flwr.common.logger  # noqa: F401  (creates Flower's console handler, which we filter)

    def keep(record: logging.LogRecord) -> bool:
        if record.name.startswith("fl_ser"):
            return True
        # run_simulation is deprecated in favour of `flwr run`; it is still the in-process path (DEVELOPERS.md).
        # Libraries' INFO chatter (Flower's, and alembic's when Flower's state store loads) stays in the log file.
        return record.levelno >= logging.WARNING and "run_simulation" not in record.getMessage()

    for logger in (logging.getLogger(), logging.getLogger("flwr")):
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(keep)


def announce(resolved: DictConfig) -> None:
    """Set up the run dir (refusing one that holds a run, unless resuming it) and the environment for Flower,
    and say what is about to run."""
    from fl_ser.durable import write_atomically
    from server.records import RunDirInUse, refuse_reuse

    run_dir = Path(resolved.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resolved.get("resume"):
        try:
            refuse_reuse(run_dir)
        except RunDirInUse as err:
            raise ConfigError(str(err)) from None
        if (run_dir / "config.yaml").exists():  # a run that died before its first round: still a run
            raise ConfigError(f"run dir {run_dir} already holds a run's config.yaml; continue it with "
                              f"`python -m experiments.train resume={run_dir}`, or give a new dir (hydra.run.dir=DIR)")
        write_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    # Nothing depends on the user's home Flower configuration; no runtime dependency installs.
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's GCS keeps an event record of every task (each device message is one) up to 100,000 of them: ~3.6 KB
    # each, so a long simulation's memory grew with rounds (the soak: +77 MiB per 100 rounds). fl-ser reads none.
    os.environ.setdefault("RAY_task_events_max_num_task_in_gcs", "1000")
    if not resolved.verbose:
        quiet_console()
    what = "resuming" if resolved.get("resume") else f"{len(resolved.labels)} emotions,"
    print(f"fl-ser: {what} privacy={resolved.privacy.name}, aggregation={resolved.aggregation.name}, "
          f"{resolved.rounds} rounds on {resolved.federation.engine} -> {run_dir}", flush=True)


class RunFailed(RuntimeError):
    """The run ended without a trained model (stopped, or nothing aggregated); the message says why."""


def report(resolved: DictConfig, summary: dict) -> None:
    """Print the outcome; a run that did not train raises :class:`RunFailed` (never a 'done' line)."""
    for warning in summary.get("warnings", []):
        print(f"fl-ser: WARNING: {warning}", file=sys.stderr, flush=True)
    if summary.get("status", "completed") != "completed":
        raise RunFailed(f"the run {summary['status']} after {summary.get('rounds_completed', 0)} of "
                        f"{summary['rounds']} rounds: {summary.get('error') or 'no round aggregated any update'}. "
                        f"No model was released. Details: {resolved.run_dir}/summary.json")
    chance = 1 / len(resolved.labels)
    print(f"done in {summary['wall_s']:.0f} s: held-out UAR {summary['uar']:.3f} (chance {chance:.3f}), "
          f"accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}, "
          f"epsilon_sample_max {summary['epsilon_sample_max']}, epsilon_user {summary['epsilon_user']} | "
          f"{resolved.run_dir}/summary.json", flush=True)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run (or, with ``resume``, continue) the experiment; ``overrides`` are the command line's (for resume)."""
    resolved = resumed(cfg, overrides or []) if cfg.get("resume") else prepare(cfg)
    announce(resolved)
    if resolved.federation.engine == "deployment":
        from experiments.deployment import run_deployment

        summary = run_deployment(resolved)
    else:
        summary = simulate(resolved)
    report(resolved, summary)
    return summary


def cli(job, cfg: DictConfig) -> None:
    """Run a job for the command line: SIGTERM stops it cleanly (Ray included), config errors exit 2 with the fix."""
    import signal

    from experiments.deployment import DeploymentError

    def stop(signum, frame):
        raise SystemExit(f"fl-ser: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        job(cfg)
    except ConfigError as err:
        print(f"fl-ser: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    except (DeploymentError, RunFailed) as err:
        print(f"fl-ser: {err}", file=sys.stderr)
        sys.exit(1)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    cli(lambda c: run(c, overrides), cfg)


if __name__ == "__main__":
    main()
