"""The Flower ServerApp: sample devices, securely aggregate their clipped updates, add user-level noise,
evaluate on held-out speakers every round, checkpoint, and release the global model back to the devices.

Uses Flower's legacy workflow path because SecAgg+ exists only there in
flwr 1.42: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a
``LegacyContext``, with the configured strategy wrapped by
:class:`server.user_dp.UserLevelDP` when updates are clipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("fl_ser.server")


def clients_per_round(cfg: DictConfig, num_devices: int) -> int:
    m = cfg.clients_per_round
    m = num_devices if m is None else int(m)
    if not 2 <= m <= num_devices:
        raise ValueError(f"clients_per_round={cfg.clients_per_round} must be between 2 and the number of devices "
                         f"({num_devices}); SecAgg+ needs at least 2 participants per round")
    return m


def reply_timeout(cfg: DictConfig) -> float | None:
    """Seconds the server waits for a device's reply before counting it as dropped (None: wait for all)."""
    t = cfg.federation.get("reply_timeout_s")
    return None if t is None else float(t)


def expected_devices(cfg: DictConfig, num_training_speakers: int) -> int:
    """Devices taking part: one per training speaker, unless the federation names a number (real devices)."""
    n = cfg.federation.get("num_devices")
    return num_training_speakers if n is None else int(n)


def run_server(grid, context, cfg: DictConfig) -> dict:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from fl_ser.flower_compat import ResumableWorkflow, csprng_client_manager
    from fl_ser.privacy.accountant import user_level_epsilon
    from fl_ser.privacy.budget import distributed, distributed_settings, user_level_noise
    from fl_ser.task import get_arrays, new_classifier
    from server import checkpoint, pretrain
    from server.evaluation import HeldOutEvaluator
    from server.grid import prompt_grid
    from server.records import RunRecorder, RunStopped
    from server.release import deploy_and_collect, release_model
    from server.replies import ReplyCheck
    from server.secure_aggregation import fit_workflow
    from server.user_dp import UserLevelDP

    run_dir = Path(cfg.run_dir)
    corpus = corpus_from_config(cfg)
    split = split_from_config(cfg, corpus)
    num_devices = expected_devices(cfg, len(split.train))
    m = clients_per_round(cfg, num_devices)
    rounds = int(cfg.rounds)
    user = cfg.privacy.user_level
    z_user = user_level_noise(cfg, m / num_devices) if cfg.privacy.update_clipping.enabled else 0.0

    def user_eps(r: int):
        return user_level_epsilon(z_user, m / num_devices, r, float(user.delta), str(user.accountant))

    resumed = checkpoint.load(run_dir) if cfg.get("resume") else None
    restored_records = resumed.records if resumed else ({"rows": [], "epsilons": {}, "devices": {}, "wall_s": 0.0,
                                                         "resumed_after": []} if cfg.get("resume") else None)
    evaluator = HeldOutEvaluator(cfg, split.test)
    recorder = RunRecorder(run_dir, rounds, user_eps, int(cfg.federation.get("max_empty_rounds", 3)),
                           restored=restored_records)
    pretrained = None if resumed else pretrain.pretrained_arrays(cfg)  # a resumed run's params: its checkpoint
    init = resumed.params if resumed else (pretrained[0] if pretrained else
                                           get_arrays(new_classifier(cfg, len(cfg.labels))))

    secure = fit_workflow(cfg, m)  # SecAgg+ or CKKS; None: plain aggregation (Flower's default fit)

    def round_outcome() -> dict:
        """Who was sampled, lost where, and why (the secure protocol's stages, or the plain fit's replies)."""
        report = secure.round_report if secure is not None else reply_check.last_round
        return {"sampled": report["sampled"], "participants": report["participants"], "dropped": report["dropped"],
                "malformed": report["malformed"], "causes": report["failure_causes"]}

    def evaluate_fn(server_round, arrays, config):
        loss, report = evaluator(arrays)
        recorder.round_done(server_round, loss, report, arrays, outcome=round_outcome() if server_round else None)
        return loss, {"uar": report["uar"]}

    strategy = instantiate(
        cfg.strategy, fraction_fit=m / num_devices, min_fit_clients=m, min_available_clients=num_devices,
        fraction_evaluate=0.0, min_evaluate_clients=0, initial_parameters=ndarrays_to_parameters(init),
        evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=recorder.aggregate_fit_metrics,
        on_fit_config_fn=lambda r: {"server_round": r},
    )
    if cfg.privacy.update_clipping.enabled:
        strategy = UserLevelDP(strategy, float(cfg.privacy.update_clipping.clipping_norm), z_user, str(user.placement))
    shares = distributed_settings(cfg, secure.threshold, m) if distributed(cfg) else None
    if shares is not None:
        from fl_ser.privacy.distributed import SecAggGrid
        from server.distributed_dp import DistributedStep

        lattice = SecAggGrid(float(cfg.aggregation.clipping_range), secure.quantization_range)
        strategy = DistributedStep(strategy, lattice, float(cfg.privacy.distributed.step_size), shares)
    strategy = reply_check = ReplyCheck(strategy)  # outermost: a malformed reply never reaches the aggregate
    if resumed:
        checkpoint.restore_optimiser(strategy, resumed.optimiser)

    def after_round(server_round: int, ctx) -> None:
        params = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        checkpoint.save(run_dir, checkpoint.ServerState(server_round, parameters_to_ndarrays(params),
                                                        recorder.state(), checkpoint.optimiser_state(strategy)))
        recorder.check_progress(server_round)

    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds, round_timeout=reply_timeout(cfg)),
                           strategy=strategy, client_manager=csprng_client_manager())
    grid = prompt_grid(grid, cfg)
    workflow = ResumableWorkflow(fit_workflow=secure,
                                 start_round=resumed.round + 1 if resumed else 1, after_round=after_round)
    stopped = None
    try:
        workflow(grid, legacy)
    except RunStopped as err:
        stopped = str(err)
        log.error("%s", err)

    final = init
    if MAIN_PARAMS_RECORD in legacy.state.array_records:
        params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        final = parameters_to_ndarrays(params)
    outcome = recorder.outcome()
    summary = {
        "status": "stopped" if stopped else ("completed" if outcome["trained"] else "untrained"), "error": stopped,
        "rounds": rounds, "num_devices": num_devices, "clients_per_round": m, **outcome,
        "epsilon_sample_max": recorder.epsilon_sample_max, "epsilon_sample": recorder.epsilon_split(),
        "epsilon_user": user_eps(outcome["rounds_completed"]), "normalization": str(cfg.privacy.normalization.mode),
        "delta": float(cfg.privacy.dp_sgd.delta) if cfg.privacy.dp_sgd.enabled else None,
        "delta_user": float(user.delta) if z_user > 0 else None,
        "num_test_speakers": len(split.test), "test_speakers": list(split.test),
        "num_utterances": sum(len(corpus.utterances_of(s)) for s in (*split.train, *split.test)),
        "num_test_utterances": evaluator.num_utterances, "labels": list(cfg.labels),
        "privacy": str(cfg.privacy.name), "aggregation": str(cfg.aggregation.name),
        "strategy": str(cfg.strategy._target_).rsplit(".", 1)[-1],
    }
    summary["pretrained"] = pretrained[1] if pretrained else (pretrain.resumed_record(cfg) if resumed else None)
    if shares is not None:  # the guarantee against the aggregator and what one device's share carries
        ((z, rate, _),) = shares.round_entries()
        summary["distributed_dp"] = {"noise_multiplier": z, "min_contributors": shares.min_contributors,
                                     "share_noise_multiplier": shares.local_noise_multiplier,
                                     "expected_batch": shares.expected_batch, "sampling_rate": rate}
    if summary["status"] != "completed":  # nothing trained is released: the devices keep what they have
        if not stopped:
            log.error("no round aggregated any update: no release is made (README 'When things go wrong')")
        return recorder.write_summary(summary)
    loss, report = evaluator(final)
    probe = corpus.load_speaker(split.test[0])[1][:2] if split.test else []  # real audio the formats are checked on
    release = release_model(cfg, final, evaluator.normalization.published(), run_dir / "release", waves=probe)
    devices = deploy_and_collect(grid, cfg, final, Path(release["dir"]), rounds) if cfg.release.deploy else []
    summary.update({
        "uar": report["uar"], "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
        "uar_by_group": report.get("uar_by_group"), "recall": report["recall"], "loss": loss,
        "confusion": report["confusion"], "uar_by_speaker": report["uar_by_speaker"],
        "worst_speaker_uar": report["worst_speaker_uar"], "worst_speaker": report["worst_speaker"],
        "uar_new_device": report["new_device"]["uar"], "new_device": report["new_device"],
        "release": release, "device_reports": devices,
        "device_uar_mean": (sum(d["uar"] for d in devices) / len(devices)) if devices else None,
    })
    return recorder.write_summary(summary)


def build_server_app(cfg: DictConfig | None = None):
    """The ServerApp for an experiment: ``cfg`` in simulation, or (None) the one each run's config carries."""
    from flwr.server import ServerApp

    from fl_ser.run_config import experiment_from_run_config

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        run_server(grid, context, cfg if cfg is not None else experiment_from_run_config(context.run_config))

    return server_app


app = build_server_app()
