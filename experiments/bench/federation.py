"""Secure aggregation cost: round time with SecAgg+ (or CKKS) versus plain aggregation of the same clipped updates.

Measurements:

- :func:`secagg_overhead`, aggregation alone: devices return a fixed update of
  the default model's size (so only aggregation differs between the modes)
  through the project's own mods and server pieces, at 10 to 200 devices
  (:func:`fixed_update_federation`, whose ``aggregation`` is plain,
  secagg_plus or ckks; :mod:`experiments.bench.aggregation` compares all three).
  Besides the round time, a timing mod measures each device's own SecAgg+ work
  (time inside the SecAgg+ mod minus the training it wraps), to show how it
  grows with the number of devices; ``num_shares`` is 'auto'
  (2 ceil(log2 n) + 1 neighbours), so the growth should be logarithmic. With
  nothing else in a round, this ratio is bounded below by SecAgg+'s four
  message exchanges against plain aggregation's one.
- :func:`default_model_overhead`, the whole round: the default experiment
  (synthetic corpus, full privacy stack, local DP-SGD training of the default
  model) with ``aggregation=plain`` and ``aggregation=secagg_plus``.
- what fl-ser's ChaCha20 masks cost against Flower's 32-bit-seeded Mersenne
  Twister (run here only, through a benchmark-only switch; fl-ser itself never
  uses Flower's): :func:`mask_prg_overhead`, round time in simulation with the
  two alternating; :func:`secagg_round_compute`, one round's computation in one
  process (:class:`InProcessGrid`, no transport: far less noisy on a busy
  machine); :func:`mask_expansion_cost`, one mask expansion.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fl_ser.flower_compat import SECAGG_DEVICE_MODULE, SECAGG_SERVER_MODULE
from fl_ser.privacy.ckks import CKKSParams

#: The aggregation settings of both harnesses: SecAgg+'s (num_shares 'auto': 2 ceil(log2 n) + 1 neighbours) and
#: CKKS's (conf/aggregation/ckks.yaml's defaults). No ``privacy.dp_sgd``: not distributed DP
#: (:func:`fl_ser.privacy.budget.distributed` is False), so CKKS devices round to ``2**-precision_bits``.
HARNESS_CONFIG = {"aggregation": {"num_shares": "auto", "reconstruction_threshold": 0.6, "clipping_range": 8.0,
                                  "max_weight": 1000.0, "quantization_range": 2 ** 22,
                                  "ckks": CKKSParams().as_dict(),  # conf/aggregation/ckks.yaml's (a test checks)
                                  "precision_bits": 20, "min_contributors": 2, "decrypt_attempts": 3},
                  "federation": {"reply_timeout_s": None, "poll_interval_s": 0.02},
                  "privacy": {"update_clipping": {"enabled": True}}}

#: What ``fixed_update_federation`` aggregates with (``aggregation.name``).
AGGREGATIONS = ("plain", "secagg_plus", "ckks")


@functools.lru_cache(maxsize=len(AGGREGATIONS))
def harness_config(aggregation: str):
    """HARNESS_CONFIG as an OmegaConf config naming ``aggregation`` (cached: devices read it per message)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: one of {AGGREGATIONS}")
    cfg = OmegaConf.create(HARNESS_CONFIG)
    cfg.aggregation.name = aggregation
    return cfg


@functools.lru_cache(maxsize=4)
def _ckks_key(path: str):
    """The harness run's secret CKKS context, read once per (Ray worker) process."""
    from clients.ckks_mod import params_of
    from fl_ser.privacy.ckks import read_secret_context

    return read_secret_context(path, params_of(harness_config("ckks")))


def stage_of(msg) -> str:
    """The protocol stage a request asks for (:func:`fl_ser.privacy.boundary.request_stage`), else ``fit``."""
    from fl_ser.privacy.boundary import request_stage

    return str(request_stage(msg) or "fit")


def _timing_mod(log_dir: str, tag: str, traffic: bool = False):
    """Logs, per message, to ``log_dir/TAG_NODE.jsonl``: the round, the stage, the wall and CPU (this process's)
    seconds inside the mod; ``traffic``: also the serialized sizes (Flower's protobuf, as a SuperNode sends them)
    of the request (``down``) and of the reply (``up``)."""

    from flwr.common.serde import message_to_proto

    def mod(msg, ctxt, call_next):
        row = {"round": int(msg.metadata.group_id or 0), "stage": stage_of(msg)}  # before the mods consume it
        if traffic:
            row["down"] = message_to_proto(msg).ByteSize()
        t0, c0 = time.perf_counter(), time.process_time()
        reply = call_next(msg, ctxt)
        row.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
        if traffic:
            row["up"] = message_to_proto(reply).ByteSize()
        with open(Path(log_dir) / f"{tag}_{ctxt.node_id}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return reply

    return mod


def read_timings(log_dir: str, tag: str) -> list[dict]:
    """Every row the ``tag`` timing mods of all devices logged in ``log_dir``."""
    return [json.loads(line) for f in sorted(Path(log_dir).glob(f"{tag}_*.jsonl"))
            for line in f.read_text().splitlines()]


def _benchmark_only_flower_masks_mod(msg, ctxt, call_next):
    """BENCHMARK ONLY (the "before" of the mask PRG comparison): runs inside the SecAgg+ mod, after fl-ser's crypto
    is installed and before the update is masked, and puts back Flower's own 32-bit-seeded Mersenne Twister."""
    _use_flower_masks(SECAGG_DEVICE_MODULE)
    return call_next(msg, ctxt)


def _use_flower_masks(module_name: str) -> None:
    """BENCHMARK ONLY: Flower's ``pseudo_rand_gen`` in one SecAgg+ module; the next fl-ser install replaces it."""
    import importlib

    from flwr.common.secure_aggregation import secaggplus_utils

    importlib.import_module(module_name).pseudo_rand_gen = secaggplus_utils.pseudo_rand_gen


def fixed_update_federation(init: list[np.ndarray], update_of: Callable[[int], list[np.ndarray]], num_devices: int,
                            aggregation: str, rounds: int = 1, clipping_norm: float = 1.0,
                            measure_dir: str | None = None, around_secagg: Sequence[Callable] = (),
                            masks: str = "fl-ser", network: Sequence[Callable] = (),
                            reports: list | None = None) -> list[tuple[float, list]]:
    """A federation whose device i returns (global + update_of(i)) through the project's real device mods
    (privacy boundary, the secure aggregation mod of ``aggregation``: fl-ser's SecAgg+ mod or the CKKS mod, the
    update clipping of the device's policy) and server pieces (ReplyCheck around UserLevelDP without noise, the
    fit workflow of ``aggregation`` as :func:`server.secure_aggregation.fit_workflow` builds it from
    :data:`HARNESS_CONFIG`), on the project's simulation runtime. ``aggregation``: one of :data:`AGGREGATIONS`;
    with ckks, the run makes one secret CKKS context, which every device reads from a temporary key file.
    Returns (time, global arrays) after each round. ``update_of`` travels with every message (Flower ships the
    ClientApp to its workers each time), so it should compute the update rather than hold everyone's.

    With ``measure_dir``, each device logs (:func:`_timing_mod`, read back with :func:`read_timings`) its
    whole handling of each message, traffic included ("device", just inside ``network``), the training
    ("training", innermost) and, under secure aggregation, the time inside the secure aggregation mod ("outer")
    and in what it wraps ("inner"). ``around_secagg``: mods placed just outside the secure aggregation mod
    (tests observe the protocol there). ``network``: mods outside the device's privacy boundary (fault
    injection, :mod:`clients.faults`). ``reports``: gets each round's reports, ``{"fit": ReplyCheck.last_round,
    "secagg": SecAggPlus.round_report or None, "ckks": CKKSAggregation's round_report and last_round, or
    None}``. ``masks="flower"`` is for benchmarks only: both sides expand SecAgg+ masks with Flower's own (weak)
    PRG, to measure what fl-ser's costs.
    """
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    from experiments.simulation import run_simulation
    from fl_ser.flower_compat import install_secagg_server_crypto, secaggplus_mod
    from fl_ser.privacy.boundary import make_boundary_mod
    from fl_ser.privacy.policy import DevicePolicy, make_policy_mods
    from server.grid import prompt_grid
    from server.replies import ReplyCheck
    from server.secure_aggregation import fit_workflow
    from server.user_dp import UserLevelDP

    cfg = harness_config(aggregation)
    if masks not in ("fl-ser", "flower"):
        raise ValueError(f"masks={masks!r}: 'fl-ser', or 'flower' (benchmarks only)")
    flower_masks = aggregation == "secagg_plus" and masks == "flower"

    class FixedUpdate(NumPyClient):
        def __init__(self, pid):
            self.update = update_of(pid)

        def fit(self, parameters, config):
            return [p + u for p, u in zip(parameters, self.update, strict=True)], 1, {"declined": 0}

    key_dir = None
    if aggregation == "secagg_plus":
        secure_mods = [secaggplus_mod, *([_benchmark_only_flower_masks_mod] if flower_masks else [])]
    elif aggregation == "ckks":
        from clients.ckks_mod import make_ckks_mod, params_of
        from fl_ser.privacy.ckks import new_context, write_secret_context

        key_dir = tempfile.mkdtemp(prefix="fl-ser-bench-ckks-")
        key = str(write_secret_context(Path(key_dir) / "secret.key", new_context(params_of(cfg))))
        secure_mods = [make_ckks_mod(lambda ctxt: _ckks_key(key), lambda ctxt: (harness_config("ckks"), None))]
    else:
        secure_mods = []
    if measure_dir and secure_mods:
        secure_mods = [_timing_mod(measure_dir, "outer"), *secure_mods, _timing_mod(measure_dir, "inner")]
    mods = [*network, *([_timing_mod(measure_dir, "device", traffic=True)] if measure_dir else []),
            make_boundary_mod(aggregation != "plain", uniform_weight=True),
            *(around_secagg if secure_mods else ()), *secure_mods,
            make_policy_mods(lambda ctxt: (DevicePolicy(max_update_norm=clipping_norm), None))[1],
            *([_timing_mod(measure_dir, "training")] if measure_dir else [])]
    client = ClientApp(client_fn=lambda ctx: FixedUpdate(int(ctx.node_config["partition-id"])).to_client(), mods=mods)
    seen: list[tuple[float, list]] = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        workflow = fit_workflow(cfg, num_devices)

        def evaluate(server_round, arrays, config):
            if server_round:
                seen.append((time.perf_counter(), arrays))
                if reports is not None:
                    reports.append({"fit": strategy.last_round,
                                    "secagg": workflow.round_report if aggregation == "secagg_plus" else None,
                                    "ckks": {**workflow.round_report, **workflow.last_round}
                                    if aggregation == "ckks" else None})

        strategy = ReplyCheck(UserLevelDP(
            FedAvg(fraction_fit=1.0, min_fit_clients=num_devices, min_available_clients=num_devices,
                   fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(init), evaluate_fn=evaluate),
            clipping_norm=clipping_norm, noise_multiplier=0.0, placement="server"))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        if flower_masks:
            _use_flower_masks(SECAGG_SERVER_MODULE)
        DefaultWorkflow(fit_workflow=workflow)(prompt_grid(grid, cfg), legacy)

    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=num_devices,
                       backend_config={"client_resources": {"num_cpus": 1},
                                       "init_args": {"include_dashboard": False, "log_to_driver": False}})
    finally:
        if flower_masks:
            install_secagg_server_crypto()
        if key_dir:
            shutil.rmtree(key_dir)
    return seen


class InProcessGrid(Grid):
    """A grid that hands each message (a copy, as a transport would) to an in-process device and returns its
    reply at once: a SecAgg+ round's own computation, with no transport, scheduling or polling."""

    def __init__(self, devices: dict[int, Callable]):
        from flwr.app import Context, RecordDict

        self.devices = devices
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": pid}, state=RecordDict(),
                                      run_config={}) for pid, nid in enumerate(devices)}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            replies.append(self.devices[msg.metadata.dst_node_id](msg, self.contexts[msg.metadata.dst_node_id]))
        return replies

    def get_node_ids(self):
        return list(self.devices)

    def _not_used(self, *args, **kwargs):
        raise NotImplementedError("InProcessGrid only sends and receives")

    set_run = create_message = push_messages = pull_messages = _not_used
    run = property(_not_used)


def in_process_device(update: list[np.ndarray], masks: str = "fl-ser", secagg_mod: Callable | None = None,
                      outer: Sequence[Callable] = (), inner: Sequence[Callable] = ()):
    """A device (its mod chain) that adds ``update`` to the global model behind fl-ser's SecAgg+ mod, or behind
    ``secagg_mod``; ``outer`` mods go before the SecAgg+ mod (e.g. the privacy boundary), ``inner`` ones between
    it and training (e.g. the policy's update clipping); ``masks="flower"`` (benchmarks only) masks with
    Flower's own PRG."""
    from flwr.client.mod.utils import make_ffn
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as rd

    from fl_ser.flower_compat import secaggplus_mod

    def fit(msg, ctxt):
        params = parameters_to_ndarrays(rd.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        new = ndarrays_to_parameters([p + u for p, u in zip(params, update, strict=True)])
        return Message(rd.fitres_to_recorddict(FitRes(Status(Code.OK, ""), new, 1, {}), keep_input=False),
                       reply_to=msg)

    flower_masks = [_benchmark_only_flower_masks_mod] if masks == "flower" else []
    return make_ffn(fit, [*outer, secagg_mod or secaggplus_mod, *flower_masks, *inner])


def in_process_secagg_round(devices: dict[int, Callable], init: list[np.ndarray], server_masks: str = "fl-ser"):
    """One round of the server's SecAgg+ workflow (``server.secure_aggregation``) with FedAvg over ``devices``
    (node id -> device), all in this process: returns the new global arrays and the round's failures.
    ``server_masks="flower"`` (benchmarks and tests only) unmasks with Flower's own PRG."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as rd
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.supercore.task_identity import TaskIdentity

    from fl_ser.flower_compat import install_secagg_server_crypto
    from server.secure_aggregation import secagg_workflow

    failures: list[BaseException] = []

    class Recording(FedAvg):
        def aggregate_fit(self, server_round, results, fails):
            failures.extend(fails)
            return super().aggregate_fit(server_round, results, fails)

    grid, n = InProcessGrid(devices), len(devices)
    strategy = Recording(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # Flower's runtimes set these
    try:
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        for nid in devices:
            legacy.client_manager.register(GridClientProxy(nid, grid, 1))
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": 1})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = rd.parameters_to_arrayrecord(ndarrays_to_parameters(init),
                                                                                      True)
        workflow = secagg_workflow(OmegaConf.create(HARNESS_CONFIG), n)
        if server_masks == "flower":
            _use_flower_masks(SECAGG_SERVER_MODULE)
        workflow(grid, legacy)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
        install_secagg_server_crypto()
    params = rd.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(params), failures


def secagg_round_compute(shapes: list[tuple], num_devices: int = 100, repeats: int = 5) -> dict:
    """One SecAgg+ round's computation (every device's mods and the server's workflow, in this process, no
    transport) with fl-ser's ChaCha20 masks and with Flower's Mersenne Twister masks, interleaved: wall and CPU
    seconds of each repeat, and the ratio of the minima (the repeats least disturbed by other load)."""
    init = [np.zeros(s, dtype=np.float32) for s in shapes]
    wall: dict[str, list[float]] = {"flower": [], "fl-ser": []}
    cpu: dict[str, list[float]] = {"flower": [], "fl-ser": []}
    for _ in range(repeats):
        for masks in wall:
            devices = {1000 + p: in_process_device(seeded_update(shapes, p), masks) for p in range(num_devices)}
            t0, c0 = time.perf_counter(), time.process_time()
            in_process_secagg_round(devices, init, server_masks=masks)
            wall[masks].append(time.perf_counter() - t0)
            cpu[masks].append(time.process_time() - c0)
    return {"secagg_round_compute_wall_s": wall, "secagg_round_compute_cpu_s": cpu,
            "secagg_round_compute_wall_ratio": min(wall["fl-ser"]) / min(wall["flower"]),
            "secagg_round_compute_cpu_ratio": min(cpu["fl-ser"]) / min(cpu["flower"])}


def seeded_update(shapes: list[tuple], pid: int) -> list[np.ndarray]:
    """Device ``pid``'s update: small Gaussian values, the same in every round and in both modes."""
    rng = np.random.default_rng(pid)
    return [rng.normal(0, 0.01, s).astype(np.float32) for s in shapes]


def round_cost(num_devices: int, aggregation: str, shapes: list[tuple], rounds: int = 3,
               masks: str = "fl-ser") -> dict:
    """One fixed-update federation's costs. Over the warm rounds (all but round 1, which pays for actor start-up
    and imports): the median round time; per device and round, the bytes it received (``down``) and sent
    (``up``) and its CPU seconds outside training; messages and exchanges (distinct stages) per round, and by
    stage the messages per round and mean bytes per message. Over all rounds: ``mod_s_per_device_round``,
    the wall time inside the secure aggregation mod minus what it wraps. ``first_global``: the global arrays
    after round 1."""
    init = [np.zeros(s, dtype=np.float32) for s in shapes]
    log_dir = tempfile.mkdtemp(prefix="fl-ser-bench-")
    try:
        seen = fixed_update_federation(init, partial(seeded_update, shapes), num_devices, aggregation,
                                       rounds=rounds, measure_dir=log_dir, masks=masks)
        rows = {tag: read_timings(log_dir, tag) for tag in ("device", "training", "outer", "inner")}
    finally:
        shutil.rmtree(log_dir)
    warm = set(range(2, rounds + 1)) or {1}
    device = [r for r in rows["device"] if r["round"] in warm]
    training = [r for r in rows["training"] if r["round"] in warm]
    per_round, per_device_round = len(warm), len(warm) * num_devices
    stages = {}
    for stage in sorted({r["stage"] for r in device}):
        at = [r for r in device if r["stage"] == stage]
        stages[stage] = {"messages_per_round": len(at) / per_round,
                         "down_bytes": float(np.mean([r["down"] for r in at])),
                         "up_bytes": float(np.mean([r["up"] for r in at]))}
    result = {"round_s": float(np.median(np.diff([t for t, _ in seen]))) if rounds > 1 else None,
              "down_bytes_per_device_round": sum(r["down"] for r in device) / per_device_round,
              "up_bytes_per_device_round": sum(r["up"] for r in device) / per_device_round,
              "device_cpu_s_per_round": (sum(r["cpu"] for r in device) - sum(r["cpu"] for r in training))
              / per_device_round,
              "messages_per_round": len(device) / per_round,
              "exchanges_per_round": len({(r["round"], r["stage"]) for r in device}) / per_round,
              "stages": stages, "first_global": seen[0][1]}
    if aggregation != "plain":
        outer, inner = (sum(r["wall"] for r in rows[tag]) for tag in ("outer", "inner"))
        result["mod_s_per_device_round"] = (outer - inner) / (num_devices * rounds)
    return result


def mask_prg_overhead(shapes: list[tuple], num_devices: int = 100, alternations: int = 4, rounds: int = 4) -> dict:
    """SecAgg+ round time with fl-ser's ChaCha20 masks against Flower's own Mersenne Twister masks, measured
    side by side: the two variants alternate (Flower's first in odd pairs, fl-ser's first in even ones), so
    that a busy machine slows both alike. Flower's masks are run for this comparison only."""
    runs: dict[str, list[float]] = {"flower": [], "fl-ser": []}
    for i in range(alternations):
        for masks in (("flower", "fl-ser") if i % 2 == 0 else ("fl-ser", "flower")):
            cost = round_cost(num_devices, "secagg_plus", shapes=shapes, rounds=rounds, masks=masks)
            runs[masks].append(cost["round_s"])
            print(f"  masks {masks:6s} {num_devices} devices: {cost['round_s']:.3f} s per round, per-device SecAgg+ "
                  f"work {1e3 * cost['mod_s_per_device_round']:.1f} ms", flush=True)
    median = {k: float(np.median(v)) for k, v in runs.items()}
    pairs = [a / b for a, b in zip(runs["fl-ser"], runs["flower"], strict=True)]  # each pair ran back to back
    return {"mask_prg_round_s": runs, "mask_prg_round_s_median": median,
            "mask_prg_round_ratio": median["fl-ser"] / median["flower"],
            "mask_prg_pair_ratio_median": float(np.median(pairs))}


def mask_expansion_cost(shapes: list[tuple], repeats: int = 2000) -> dict:
    """Microseconds to expand one SecAgg+ mask for ``shapes`` (modulus 2^32): Flower's ``pseudo_rand_gen``
    against fl-ser's :func:`~fl_ser.privacy.secagg_crypto.mask_prg`, interleaved, best of 5 batches each."""
    import os
    import timeit

    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from fl_ser.privacy.secagg_crypto import mask_prg

    seed = os.urandom(32)
    best = {"flower": math.inf, "fl-ser": math.inf}
    for _ in range(5):
        for name, prg in (("flower", pseudo_rand_gen), ("fl-ser", mask_prg)):
            t = timeit.timeit(lambda prg=prg: prg(seed, 1 << 32, shapes), number=repeats) / repeats
            best[name] = min(best[name], t)
    size = sum(math.prod(s) for s in shapes)
    return {"values": size, "flower_us": 1e6 * best["flower"], "fl_ser_us": 1e6 * best["fl-ser"],
            "ratio": best["fl-ser"] / best["flower"]}


def secagg_overhead(shapes: list[tuple], counts=(10, 50, 100, 200)) -> dict:
    overhead, per_device = {}, {}
    for n in counts:
        plain = round_cost(n, "plain", shapes=shapes)
        secure = round_cost(n, "secagg_plus", shapes=shapes)
        overhead[str(n)] = secure["round_s"] / plain["round_s"]
        per_device[str(n)] = secure["mod_s_per_device_round"]
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
