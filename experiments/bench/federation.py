"""Secure aggregation cost: round time with SecAgg+ versus plain aggregation of the same clipped updates.

Two measurements:

- :func:`secagg_overhead`, aggregation alone: devices return a fixed update of
  the default model's size (so only aggregation differs between the two modes)
  through the project's own mods and server pieces, at 10 to 200 devices.
  Besides the round time, a timing mod measures each device's own SecAgg+ work
  (time inside the SecAgg+ mod minus the training it wraps), to show how it
  grows with the number of devices; ``num_shares`` is 'auto'
  (2 ceil(log2 n) + 1 neighbours), so the growth should be logarithmic. With
  nothing else in a round, this ratio is bounded below by SecAgg+'s four
  message exchanges against plain aggregation's one.
- :func:`default_model_overhead`, the whole round: the default experiment
  (synthetic corpus, full privacy stack, local DP-SGD training of the default
  model) with ``aggregation=plain`` and ``aggregation=secagg_plus``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def _timing_mod(log_dir: str, tag: str):
    def mod(msg, ctxt, call_next):
        t0 = time.perf_counter()
        reply = call_next(msg, ctxt)
        with open(Path(log_dir) / f"{tag}_{ctxt.node_id}.txt", "a") as f:
            f.write(f"{time.perf_counter() - t0}\n")
        return reply

    return mod


def fixed_update_federation(init: list[np.ndarray], update_of: Callable[[int], list[np.ndarray]], num_devices: int,
                            secure: bool, rounds: int = 1, clipping_norm: float = 1.0,
                            measure_dir: str | None = None) -> list[tuple[float, list]]:
    """A federation whose device i returns (global + update_of(i)) through the project's real device mods
    (privacy boundary, SecAgg+, fixed clipping) and server pieces (UserLevelDP without noise, the SecAgg+
    workflow as configured), on the project's simulation runtime. Returns (time, global arrays) after each
    round. ``update_of`` travels with every message (Flower ships the ClientApp to its workers each time), so
    it should compute the update rather than hold everyone's. With ``measure_dir``, each device logs the
    seconds spent inside ``secaggplus_mod`` ("outer") and in what it wraps ("inner").
    """
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import fixedclipping_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    from clients.mods import secure_aggregation_mod
    from experiments.simulation import run_simulation
    from fl_ser.privacy.boundary import make_boundary_mod
    from server.grid import prompt_grid
    from server.secagg import secagg_workflow
    from server.user_dp import UserLevelDP

    class FixedUpdate(NumPyClient):
        def __init__(self, pid):
            self.update = update_of(pid)

        def fit(self, parameters, config):
            return [p + u for p, u in zip(parameters, self.update, strict=True)], 1, {"declined": 0}

    mods = [make_boundary_mod(secure)]
    if secure and measure_dir:
        mods += [_timing_mod(measure_dir, "outer"), secure_aggregation_mod, _timing_mod(measure_dir, "inner")]
    elif secure:
        mods.append(secure_aggregation_mod)
    mods.append(fixedclipping_mod)
    client = ClientApp(client_fn=lambda ctx: FixedUpdate(int(ctx.node_config["partition-id"])).to_client(), mods=mods)
    seen: list[tuple[float, list]] = []
    cfg = OmegaConf.create({"aggregation": {"num_shares": "auto", "reconstruction_threshold": 0.6,
                                            "clipping_range": 8.0, "max_weight": 1000.0},
                            "federation": {"reply_timeout_s": None, "poll_interval_s": 0.02},
                            "privacy": {"update_clipping": {"enabled": True}}})
    server = ServerApp()

    @server.main()
    def main(grid, context):
        strategy = UserLevelDP(
            FedAvg(fraction_fit=1.0, min_fit_clients=num_devices, min_available_clients=num_devices,
                   fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(init),
                   evaluate_fn=lambda r, arrays, c: seen.append((time.perf_counter(), arrays)) if r else None),
            clipping_norm=clipping_norm, noise_multiplier=0.0, placement="server")
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=secagg_workflow(cfg, num_devices) if secure else None)
        workflow(prompt_grid(grid, cfg), legacy)

    run_simulation(server_app=server, client_app=client, num_supernodes=num_devices,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"include_dashboard": False, "log_to_driver": False}})
    return seen


def seeded_update(shapes: list[tuple], pid: int) -> list[np.ndarray]:
    """Device ``pid``'s update: small Gaussian values, the same in every round and in both modes."""
    rng = np.random.default_rng(pid)
    return [rng.normal(0, 0.01, s).astype(np.float32) for s in shapes]


def round_cost(num_devices: int, secure: bool, shapes: list[tuple], rounds: int = 3) -> dict:
    """Median round time (round 1, which pays for actor start-up, excluded) and per-device SecAgg+ work."""
    init = [np.zeros(s, dtype=np.float32) for s in shapes]
    log_dir = tempfile.mkdtemp(prefix="fl-ser-bench-")
    seen = fixed_update_federation(init, partial(seeded_update, shapes), num_devices, secure, rounds=rounds,
                                   measure_dir=log_dir)
    result = {"round_s": float(np.median(np.diff([t for t, _ in seen])))}
    if secure:
        outer = sum(float(v) for f in Path(log_dir).glob("outer_*") for v in f.read_text().split())
        inner = sum(float(v) for f in Path(log_dir).glob("inner_*") for v in f.read_text().split())
        result["secagg_s_per_device_round"] = (outer - inner) / (num_devices * rounds)
    return result


def secagg_overhead(shapes: list[tuple], counts=(10, 50, 100, 200)) -> dict:
    overhead, per_device = {}, {}
    for n in counts:
        plain = round_cost(n, secure=False, shapes=shapes)
        secure = round_cost(n, secure=True, shapes=shapes)
        overhead[str(n)] = secure["round_s"] / plain["round_s"]
        per_device[str(n)] = secure["secagg_s_per_device_round"]
        print(f"  secagg {n:4d} devices: plain {plain['round_s']:.2f} s, SecAgg+ {secure['round_s']:.2f} s, "
              f"x{overhead[str(n)]:.2f}; per-device SecAgg+ work {1e3 * per_device[str(n)]:.1f} ms", flush=True)
    # fit per-device work ~ a * n^b (power law) and ~ c + d log n; logarithmic growth means b well below 1
    ns = np.array([int(n) for n in per_device], dtype=float)
    work = np.array(list(per_device.values()))
    b, _ = np.polyfit(np.log(ns), np.log(work), 1)
    d, c = np.polyfit(np.log(ns), work, 1)
    resid_log = float(np.sqrt(np.mean((c + d * np.log(ns) - work) ** 2)))
    growth = {"power_law_exponent": float(b), "log_fit_ms_per_doubling": 1e3 * d * math.log(2),
              "log_fit_rmse_ms": 1e3 * resid_log}
    return {"secagg_overhead": overhead, "secagg_per_device_s": per_device, "secagg_per_device_growth": growth}


def default_model_overhead(plain_cfg, secure_cfg) -> dict:
    """Median round time (rounds 2+) of the same experiment with plain aggregation and with SecAgg+."""
    from experiments.bench.deployment import median_round_s
    from experiments.train import run

    times = {}
    for name, cfg in (("plain", plain_cfg), ("secagg_plus", secure_cfg)):
        run(cfg)
        times[name] = median_round_s(Path(cfg.run_dir))
    ratio = times["secagg_plus"] / times["plain"]
    devices = plain_cfg.data.num_speakers - plain_cfg.partition.num_test_speakers
    print(f"  default model, {devices} devices: plain {times['plain']:.2f} s, SecAgg+ {times['secagg_plus']:.2f} s "
          f"per round, x{ratio:.2f}", flush=True)
    return {"secagg_overhead_default_model": ratio, "secagg_default_model_round_s": times,
            "secagg_default_model_devices": devices}
