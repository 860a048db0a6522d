"""Run one federated experiment from the Hydra config: ``python -m experiments.train [overrides]``.

Resolves the config once (filling the label set from the corpus), checks it
(model vs features, privacy budget, federation size) before any process starts,
writes it to ``<run dir>/config.yaml``, runs the Flower ServerApp and ClientApps
on the simulation engine (``federation=simulation``) or submits them to a
SuperLink (``federation=deployment``, see :mod:`experiments.deployment`), and
prints the summary. Outputs land in the Hydra run
dir (``hydra.run.dir=DIR`` is respected).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fl_ser")


class ConfigError(ValueError):
    """The experiment config cannot run as written; the message names the setting and the fix."""


def prepare(cfg: DictConfig) -> DictConfig:
    """Resolve and check the config; returns a plain, fully resolved copy with ``labels`` filled in."""
    from fl_ser.data.corpus import CorpusError, corpus_from_config
    from fl_ser.data.partition import split_from_config
    from fl_ser.models.classifiers import build_classifier
    from fl_ser.privacy.accountant import PrivacyBudgetError
    from fl_ser.task import extractor_from_config

    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except Exception as err:  # MissingMandatoryValue and friends
        raise ConfigError(f"{err}. Corpora other than the synthetic one need a path, e.g. `data=emodb "
                          "data.root=/path/to/emodb` or `data=manifest data.manifest=/path/to/list.csv`.") from None
    try:
        corpus = corpus_from_config(resolved)
        split = split_from_config(resolved, corpus)
    except (CorpusError, InstantiationException) as err:  # Hydra wraps the loader's own error
        raise ConfigError(str(err.__cause__ or err)) from err
    resolved.labels = list(corpus.emotions)
    ext = extractor_from_config(resolved)
    try:
        build_classifier(resolved.model, ext.output_shape, ext.kind, len(corpus.emotions))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        check_privacy(resolved, corpus, split)
    except PrivacyBudgetError as err:
        raise ConfigError(str(err)) from err
    return resolved


def check_privacy(cfg: DictConfig, corpus, split) -> None:
    """Catch impossible budgets and unsound settings before launching: every device must be able to train at
    least one round, normaliser release included, and the normalisation must keep the stated guarantee."""
    from fl_ser.privacy import normalization
    from fl_ser.privacy.accountant import PrivacyBudgetError, check_delta, epsilon
    from fl_ser.training import LocalTrainConfig, planned_entries
    from server.server_app import clients_per_round

    priv = cfg.privacy
    m = clients_per_round(cfg, len(split.train))
    if priv.user_level.noise_multiplier > 0 and not priv.update_clipping.enabled:
        raise PrivacyBudgetError("user-level noise needs clipped updates (their sensitivity); set "
                                 "privacy.update_clipping.enabled=true or privacy.user_level.noise_multiplier=0")
    norm = normalization.from_config(cfg)  # checks the mode; computes (and caches) the public reference once
    if not priv.dp_sgd.enabled:
        return
    from clients.client_app import dp_config

    dp = dp_config(cfg)
    train = LocalTrainConfig(**OmegaConf.to_container(cfg.train))
    smallest = min(split.train, key=lambda s: len(corpus.utterances_of(s)))
    n = len(corpus.utterances_of(smallest))
    check_delta(dp.delta, n, f"device {smallest} ({n} utterances)")
    release = [norm.mechanism()] if norm.spends_privacy else []
    first = epsilon([*release, *planned_entries(n, train, dp)], dp.delta, dp.accountant)
    if first > dp.epsilon_budget:
        raise PrivacyBudgetError(
            f"impossible privacy budget: the normaliser release and one round of DP-SGD on device {smallest} ({n} "
            f"utterances, {train.epochs} epochs, batch {train.batch_size or 'all'}, noise_multiplier "
            f"{dp.noise_multiplier}) already spend epsilon {first:.2f} > privacy.dp_sgd.epsilon_budget="
            f"{dp.epsilon_budget}. Raise the budget or the noise multipliers, or lower train.epochs / "
            "train.batch_size.")
    expected = round(cfg.rounds * m / len(split.train))
    total = epsilon([*release, *planned_entries(n, train, dp) * expected], dp.delta, dp.accountant)
    if total > dp.epsilon_budget:
        log.warning("device %s would reach epsilon %.2f over %d rounds (> budget %.2f): devices will decline to "
                    "train once their budget is spent", smallest, total, expected, dp.epsilon_budget)


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
    """Set up the run dir and the environment for Flower, and say what is about to run."""
    run_dir = Path(resolved.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    # Nothing depends on the user's home Flower configuration; no runtime dependency installs.
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not resolved.verbose:
        quiet_console()
    print(f"fl-ser: {len(resolved.labels)} emotions, privacy={resolved.privacy.name}, "
          f"aggregation={resolved.aggregation.name}, {resolved.rounds} rounds on {resolved.federation.engine} "
          f"-> {run_dir}", flush=True)


def report(resolved: DictConfig, summary: dict) -> None:
    chance = 1 / len(resolved.labels)
    print(f"done in {summary['wall_s']:.0f} s: held-out UAR {summary['uar']:.3f} (chance {chance:.3f}), "
          f"accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}, "
          f"epsilon_sample_max {summary['epsilon_sample_max']}, epsilon_user {summary['epsilon_user']} | "
          f"{resolved.run_dir}/summary.json", flush=True)


def run(cfg: DictConfig) -> dict:
    resolved = prepare(cfg)
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
    except DeploymentError as err:
        print(f"fl-ser: {err}", file=sys.stderr)
        sys.exit(1)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli(run, cfg)


if __name__ == "__main__":
    main()
