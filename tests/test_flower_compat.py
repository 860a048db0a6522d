"""Every patch of Flower internals (fl_ser/flower_compat.py) takes effect, refuses another flwr version, and notices
when what it replaces has changed; SecAgg+ devices and servers agree on fl-ser's mask scheme or stop at setup.

The SecAgg+ server tests run fl-ser's server workflow against in-process devices (the benchmarks' in-process
grid hands each message, copied as a transport would, to a device's mod chain); the slow test runs a Ray
simulation and checks from inside the devices that they masked with fl-ser's keys and ChaCha20 masks, that the
server removed those masks, and that fl-ser's dispatcher delivered every message.
"""

from __future__ import annotations

import copy
import importlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from functools import partial

import flwr
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType

from experiments.bench.federation import InProcessGrid, in_process_device, in_process_secagg_round
from fl_ser import flower_compat as compat
from fl_ser.privacy.refusals import IncompatibleProtocol
from fl_ser.protocol import MASK_SCHEME, MASK_SCHEME_KEY, PublicError

GLOBAL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.full(5, 0.5, dtype=np.float32)]
SETUP = {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0,
         "target_range": 1 << 22, "mod_range": 1 << 32, "max_weight": 1.0}


def setup_message(**extra) -> Message:
    return Message(content=RecordDict({"secaggplus_configs": ConfigRecord({**SETUP, **extra})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


def new_context(node_id: int, pid: int = 0) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


def never_called(msg, ctxt):
    raise AssertionError("the setup stage never trains")


# --- the device's SecAgg+ mod ------------------------------------------------------------------------------------


def test_device_answers_fl_sers_setup_with_p256_keys_and_the_scheme(task_identity):
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    reply = compat.secaggplus_mod(setup_message(**{MASK_SCHEME_KEY: MASK_SCHEME}), new_context(7), never_called)
    configs = reply.content.config_records["secaggplus_configs"]
    assert configs[MASK_SCHEME_KEY] == MASK_SCHEME
    assert bytes_to_public_key(configs["pk1"]).curve.name == "secp256r1"  # fl-ser's keys, not Flower's P-384


@pytest.mark.parametrize("scheme, named", [(None, "Mersenne Twister"), ("hkdf-sha256+chacha20/v0", "chacha20/v0")])
def test_device_refuses_a_server_with_another_mask_scheme(task_identity, scheme, named):
    extra = {} if scheme is None else {MASK_SCHEME_KEY: scheme}
    ctxt = new_context(7)
    with pytest.raises(IncompatibleProtocol, match=named) as refused:
        compat.secaggplus_mod(setup_message(**extra), ctxt, never_called)
    assert "run fl-ser's ServerApp" in str(refused.value) and MASK_SCHEME in str(refused.value)
    assert refused.value.public == PublicError.INCOMPATIBLE_PROTOCOL
    assert "secaggplus_state" not in ctxt.state.config_records  # refused before any key was made


# --- the server's SecAgg+ workflow against in-process devices -----------------------------------------------------


def update(pid: int) -> list[np.ndarray]:
    return [np.random.default_rng(pid).normal(0, 0.05, a.shape).astype(np.float32) for a in GLOBAL]


def refusing_device(msg, ctxt):
    """A device whose mask scheme is not the server's: it answers setup with fl-ser's public refusal code."""
    error = PublicError.INCOMPATIBLE_PROTOCOL
    return Message(Error(code=int(error), reason=error.reason), reply_to=msg)


def mean_of(pids) -> list[np.ndarray]:
    return [g + np.mean([update(p)[i] for p in pids], axis=0) for i, g in enumerate(GLOBAL)]


QUANTISATION = 2 * 8.0 / 2**22  # one quantisation step at clipping_range 8 and Flower's 2^22 levels


def test_server_unmasks_fl_sers_chacha20_masks():
    new, failures = in_process_secagg_round({100 + p: in_process_device(update(p)) for p in range(5)}, GLOBAL)
    assert not failures
    for got, want in zip(new, mean_of(range(5)), strict=True):
        np.testing.assert_allclose(got, want, atol=5 * QUANTISATION)


def test_the_range_check_looks_at_the_clipped_update_that_secagg_quantises(caplog):
    """Regression (issue 10): the quantisation-range check ran in fit() on the raw parameters, before the update mod
    clipped them, so every device refused updates that fit once clipped ("weighted peak 20.5 vs clipping_range
    8.0"). Now the SecAgg+ mod checks the final update: raw peak 21, clipped to norm 1, is accepted; the same
    update on a device that does not clip it is refused with the message, and the round goes on without it."""
    from fl_ser.privacy.boundary import make_boundary_mod
    from fl_ser.privacy.policy import DevicePolicy, make_policy_mods

    def device(max_update_norm):
        clip = make_policy_mods(lambda ctxt: (DevicePolicy(max_update_norm=max_update_norm), None))[1]
        return in_process_device(raw, outer=[make_boundary_mod(True, uniform_weight=True)], inner=[clip])

    raw = [np.full(a.shape, 20.0, dtype=np.float32) for a in GLOBAL]  # global + raw peaks at 21 > 0.9 x 8
    norm = np.sqrt(sum(float((r**2).sum()) for r in raw))
    new, _ = in_process_secagg_round({100: device(1.0), 101: device(1.0), 102: device(None)}, GLOBAL)
    for got, g, r in zip(new, GLOBAL, raw, strict=True):
        np.testing.assert_allclose(got, g + r / norm, atol=2 * QUANTISATION)  # the two clipped updates
    assert "weighted peak 21 vs clipping_range 8.0 (weight 1, max_weight 1.0)" in caplog.text
    assert "Raise aggregation.clipping_range" in caplog.text
    assert caplog.text.count("does not fit SecAgg+'s quantisation range") == 1  # only the device that did not clip


def test_a_server_unmasking_with_flowers_prg_gets_a_wrong_sum():
    """Proof that the server-side PRG matters: the devices mask with ChaCha20, so Flower's Mersenne Twister
    cannot remove their masks."""
    devices = {100 + p: in_process_device(update(p)) for p in range(5)}
    new, _ = in_process_secagg_round(devices, GLOBAL, server_masks="flower")
    assert not np.allclose(new[0], mean_of(range(5))[0], atol=0.1)


def test_a_stock_flower_device_is_left_out_at_setup():
    from flwr.client.mod import secaggplus_mod as stock

    devices = {100 + p: in_process_device(update(p)) for p in range(4)} | {104: in_process_device(update(4),
                                                                                                 secagg_mod=stock)}
    new, failures = in_process_secagg_round(devices, GLOBAL)
    assert len(failures) == 1 and isinstance(failures[0], compat.MaskSchemeMismatch)
    assert "device 104" in str(failures[0]) and "run fl-ser's ClientApp on every device" in str(failures[0])
    for got, want in zip(new, mean_of(range(4)), strict=True):
        np.testing.assert_allclose(got, want, atol=4 * QUANTISATION)


def test_the_benchmark_only_switch_masks_with_flowers_prg_on_both_sides():
    from experiments.bench.federation import secagg_round_compute

    flower_devices = {100 + p: in_process_device(update(p), masks="flower") for p in range(3)}
    new, _ = in_process_secagg_round(flower_devices, GLOBAL, server_masks="flower")
    np.testing.assert_allclose(new[0], mean_of(range(3))[0], atol=3 * QUANTISATION)
    new, _ = in_process_secagg_round(flower_devices, GLOBAL)  # fl-ser's server cannot remove Flower's masks
    assert not np.allclose(new[0], mean_of(range(3))[0], atol=0.1)
    cost = secagg_round_compute([(3, 4)], num_devices=3, repeats=1)
    assert set(cost["secagg_round_compute_cpu_s"]) == {"flower", "fl-ser"}


@pytest.mark.parametrize("kind", ["stock Flower devices", "devices that refuse fl-ser's scheme"])
def test_a_server_without_any_fl_ser_device_stops_at_setup(kind):
    from flwr.client.mod import secaggplus_mod as stock

    devices = {100 + p: in_process_device(update(p), secagg_mod=stock) if kind.startswith("stock") else refusing_device
               for p in range(3)}
    with pytest.raises(compat.MaskSchemeMismatch, match="Run fl-ser's ClientApp on every device") as stopped:
        in_process_secagg_round(devices, GLOBAL)
    assert MASK_SCHEME in str(stopped.value) and "none of the 3 devices" in str(stopped.value)


# --- version and shape checks of every installer -------------------------------------------------------------------


INSTALLERS = {
    "secagg-device-crypto": compat.install_secagg_device_crypto,
    "secagg-server-crypto": compat.install_secagg_server_crypto,
    "secagg-setup-stage": lambda: compat.SecAggPlus(num_shares=3, reconstruction_threshold=2),
    "secagg-reply-check": compat.check_secagg_stages,
    "secagg-quantisation-range": compat.check_secagg_device_state,
    "simulation-dispatch": lambda: compat.proportional_dispatch().__enter__(),
    "supernode-capped-sleep": lambda: compat.install_capped_sleep(0.1),
    "supernode-heartbeat": lambda: compat.install_heartbeat_interval(10.0),
    "superexec-fork-executor": compat.install_fork_executor,
    "grid-poll-interval": lambda: compat.PromptGrid(InProcessGrid({}), 0.1),
    "control-api-run-status": lambda: compat.RunFollower("/nonexistent", "fl-ser"),
    "supernode-arguments": lambda: compat.supernode_args([]),
    "resumable-rounds": lambda: compat.ResumableWorkflow(start_round=3),
    "csprng-sampling": compat.csprng_client_manager,
}


def test_every_patch_has_an_installer_under_test():
    assert set(INSTALLERS) == {p.name for p in compat.PATCHES}


@pytest.fixture
def flowers_own(monkeypatch):
    """Flower's own functions in every place a patch replaces one (restored after the test)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.superexec.executor.factory import get_executor

    places = {compat.SECAGG_DEVICE_MODULE: {"pseudo_rand_gen": pseudo_rand_gen, "create_shares": create_shares},
              compat.SECAGG_SERVER_MODULE: {"pseudo_rand_gen": pseudo_rand_gen, "combine_shares": combine_shares},
              "flwr.supernode.start_client_internal": {"time": time},
              "flwr.supernode.fleet_http_connection": {"HEARTBEAT_DEFAULT_INTERVAL": 30},
              "flwr.supercore.heartbeat": {"HEARTBEAT_DEFAULT_INTERVAL": 30},
              "flwr.supercore.superexec.run_superexec": {"get_executor": get_executor}}
    for module, attrs in places.items():
        for attr, value in attrs.items():
            monkeypatch.setattr(importlib.import_module(module), attr, value)
    return places


@pytest.mark.parametrize("name", sorted(INSTALLERS))
def test_every_patch_refuses_another_flower_version(monkeypatch, flowers_own, name):
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(compat.FlowerCompatError) as refused:
        INSTALLERS[name]()
    message = str(refused.value)
    assert f"patch {name!r}" in message and "written for flwr 1.42.0" in message and "1.43.0 is installed" in message
    assert "Recheck" in message
    for module, attrs in flowers_own.items():  # nothing was replaced
        assert all(getattr(importlib.import_module(module), a) is v for a, v in attrs.items())


def test_the_device_mod_refuses_another_flower_version(monkeypatch, task_identity):
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(compat.FlowerCompatError, match="secagg-device-crypto"):
        compat.secaggplus_mod(setup_message(**{MASK_SCHEME_KEY: MASK_SCHEME}), new_context(7), never_called)


def test_a_patch_notices_that_flower_changed_what_it_replaces(monkeypatch, flowers_own):
    device = importlib.import_module(compat.SECAGG_DEVICE_MODULE)  # the package re-exports a function
    key = (compat.SECAGG_DEVICE_MODULE, "pseudo_rand_gen")
    monkeypatch.setattr(compat, "_ORIGINALS", {k: v for k, v in compat._ORIGINALS.items() if k != key})
    monkeypatch.setattr(device, "pseudo_rand_gen", lambda seed, num_range: None)  # a "new Flower" signature
    with pytest.raises(compat.FlowerCompatError, match=r"pseudo_rand_gen takes \('seed', 'num_range'\)"):
        compat.install_secagg_device_crypto()
    assert device.create_shares is flowers_own[compat.SECAGG_DEVICE_MODULE]["create_shares"]  # nothing half-done
    monkeypatch.delattr(device, "pseudo_rand_gen")
    with pytest.raises(compat.FlowerCompatError, match="pseudo_rand_gen no longer exists"):
        compat.install_secagg_device_crypto()


def test_a_patch_notices_that_flower_no_longer_looks_the_name_up(monkeypatch, flowers_own):
    device = importlib.import_module(compat.SECAGG_DEVICE_MODULE)  # the package re-exports a function

    monkeypatch.setattr(device, "_collect_masked_vectors", lambda state, configs, n, params: [])
    with pytest.raises(compat.FlowerCompatError, match="_collect_masked_vectors no longer uses"):
        compat.install_secagg_device_crypto()


# --- each patch took effect ----------------------------------------------------------------------------------------


def test_flowers_secagg_modules_use_fl_sers_crypto_once_installed(flowers_own):
    device = importlib.import_module(compat.SECAGG_DEVICE_MODULE)  # the package re-exports a function
    import flwr.server.workflow.secure_aggregation.secaggplus_workflow as server

    from fl_ser.privacy import secagg_crypto

    compat.install_secagg_device_crypto()
    compat.install_secagg_server_crypto()
    assert device.create_shares is secagg_crypto.create_shares and device.pseudo_rand_gen is secagg_crypto.mask_prg
    assert device.generate_key_pairs is secagg_crypto.key_pair
    assert device.bytes_to_private_key is secagg_crypto.private_key
    assert server.combine_shares is secagg_crypto.combine_shares and server.pseudo_rand_gen is secagg_crypto.mask_prg


def test_the_supernode_loop_sleeps_at_most_the_cap(monkeypatch):
    import flwr.supernode.start_client_internal as node_loop

    monkeypatch.setattr(node_loop, "time", node_loop.time)  # restored after the test
    compat.install_capped_sleep(0.05)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    node_loop.time.sleep(3)  # what the SuperNode's loop calls when idle
    node_loop.time.sleep(0.01)
    assert slept == [0.05, 0.01] and node_loop.time.monotonic() > 0


def test_the_supernode_announces_and_keeps_the_shorter_heartbeat(flowers_own):
    """The interval the SuperNode announces (ActivateNode, SendNodeHeartbeat) and paces its heartbeats by; one the
    SuperLink would refuse is an error before the SuperNode starts."""
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection

    compat.install_heartbeat_interval(10.0)
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0 == sender.HEARTBEAT_DEFAULT_INTERVAL
    waits = []
    beat = sender.HeartbeatSender(lambda: True)
    beat._stop_event.wait = lambda seconds: (waits.append(seconds), beat._stop_event.set())  # one beat, then stop
    beat._run()
    assert 0.7 * 5 <= waits[0] <= 0.9 * 5  # (interval - call timeout) x 0.7-0.9, Flower's pacing
    with pytest.raises(compat.FlowerCompatError, match="outside the SuperLink's accepted range"):
        compat.install_heartbeat_interval(5.0)


def test_the_superexec_launches_clientapps_with_the_fork_executor(monkeypatch):
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.constant import ExecutorType

    monkeypatch.setattr(superexec, "get_executor", superexec.get_executor)
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        compat.install_fork_executor()
        executor = superexec.get_executor(ExecutorType.SUBPROCESS, None, insecure=True, root_certificates_path=None)
        assert isinstance(executor, compat.ForkExecutor)
        with pytest.raises(ValueError, match="executor-config"):  # other executors stay Flower's
            superexec.get_executor(ExecutorType.KUBERNETES)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_prompt_grid_polls_at_its_interval(monkeypatch, task_identity):
    class SlowGrid(InProcessGrid):
        """Replies on the third pull, as a SuperLink does once the devices answered."""

        pulls = 0

        def push_messages(self, messages):
            self.sent = [copy.deepcopy(m) for m in messages]
            for m in self.sent:
                m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            return [m.metadata.message_id for m in self.sent]

        def pull_messages(self, message_ids):
            self.pulls += 1
            return [Message(RecordDict(), reply_to=m) for m in self.sent] if self.pulls == 3 else []

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    grid = compat.PromptGrid(SlowGrid({}), 0.02)
    replies = grid.send_and_receive([setup_message()], timeout=60)
    assert len(replies) == 1 and grid.grid.pulls == 3 and slept == [0.02, 0.02]


def test_supernode_args_reads_flowers_supernode_options():
    args = compat.supernode_args(["--insecure", "--isolation", "process", "--superlink", "127.0.0.1:9092"])
    assert args.isolation == "process" and args.host and args.port


def test_run_follower_reads_the_connection_from_the_flower_home(tmp_path):
    import tomli_w

    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    conf = {"superlink": {"default": "fl-ser", "fl-ser": {"address": "127.0.0.1:1", "root-certificates": str(ca)}}}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(conf))
    with pytest.raises(Exception) as failed:  # Flower's own client reads the connection, then the bad CA
        compat.RunFollower(str(tmp_path), "fl-ser").status(1)
    assert not isinstance(failed.value, compat.FlowerCompatError)


def test_importing_flower_compat_stays_light():
    code = "import sys, fl_ser.flower_compat; print(sorted(m for m in ('torch', 'ray', 'opacus') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def observer(out_dir: str, update_of):
    """A device mod around the SecAgg+ mod that writes what the device sent and could recompute: the curve of its
    setup key, and whether its masked vector unmasks (from its own SecAgg+ state) with fl-ser's or Flower's PRG."""

    def observe(msg, ctxt, call_next):
        import json

        import numpy as np
        from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
        from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.common.secure_aggregation.quantization import dequantize
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
        from flwr.compat.common import recorddict_compat as rd
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        from fl_ser.privacy.secagg_crypto import mask_prg
        from fl_ser.protocol import MASK_SCHEME_KEY

        configs = msg.content.config_records["secaggplus_configs"]
        stage, sources = configs["stage"], list(configs.get("srcs", []))
        reply = call_next(msg, ctxt)
        sent = reply.content.config_records["secaggplus_configs"]
        seen = {"node": ctxt.node_id, "stage": stage}
        if stage == "setup":
            seen |= {"curve": bytes_to_public_key(sent["pk1"]).curve.name, "scheme": sent[MASK_SCHEME_KEY]}
        if stage == "collect_masked_vectors":
            state = SecAggPlusState(**ctxt.state.config_records["secaggplus_state"])
            masked = [bytes_to_ndarray(b) for b in sent["masked_params"]]
            shapes = [a.shape for a in masked]

            def unmask(prg):
                total = prg(state.rd_seed, state.mod_range, shapes)
                for src in sources:
                    key = generate_shared_key(bytes_to_private_key(state.sk1),
                                              bytes_to_public_key(state.public_keys_dict[src][0]))
                    sign = 1 if state.nid > src else -1
                    total = [t + sign * m for t, m in zip(total, prg(key, state.mod_range, shapes), strict=True)]
                return [np.mod(a - t, state.mod_range) for a, t in zip(masked, total, strict=True)]

            ours, flowers = unmask(mask_prg), unmask(pseudo_rand_gen)
            global_model = parameters_to_ndarrays(rd.recorddict_to_fitins(msg.content, keep_input=True).parameters)
            mine = [g + u for g, u in zip(global_model, update_of(int(ctxt.node_config["partition-id"])),
                                          strict=True)]
            values = dequantize(ours[1:], state.clipping_range, state.target_range)
            seen |= {"weight_factor_unmasked": int(ours[0][0]) == state.target_range,
                     "flower_unmasks_it": int(flowers[0][0]) == state.target_range,
                     "max_error": max(float(np.abs(v - w).max()) for v, w in zip(values, mine, strict=True))}
        with open(f"{out_dir}/node_{ctxt.node_id}.jsonl", "a") as f:
            f.write(json.dumps(seen) + "\n")
        return reply

    return observe


@pytest.mark.slow
def test_a_secagg_federation_runs_fl_sers_crypto_and_dispatcher(tmp_path):
    """30 virtual devices, one SecAgg+ round, in Flower's simulation with Ray: every device sent P-256 keys and the
    scheme, masked with ChaCha20 (its masked vector unmasks to its own update with fl-ser's PRG and not with
    Flower's), the server removed those masks (the sum is right), and fl-ser's dispatcher delivered all 4 x 30
    messages."""
    from experiments.bench.federation import fixed_update_federation, seeded_update

    shapes, n = [(16, 74), (16,), (7, 16), (7,)], 30
    init = [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for s in shapes]
    update_of = partial(seeded_update, shapes)  # small: nothing is clipped
    before = Counter(compat.dispatch_counts)
    seen = fixed_update_federation(init, update_of, n, "secagg_plus",
                                   around_secagg=[observer(str(tmp_path), update_of)])
    dispatched = compat.dispatch_counts - before
    assert dispatched["messages"] == 4 * n and dispatched["passes"] > 0
    rows = [json.loads(line) for f in tmp_path.glob("node_*.jsonl") for line in f.read_text().splitlines()]
    setups = [r for r in rows if r["stage"] == "setup"]
    masked = [r for r in rows if r["stage"] == "collect_masked_vectors"]
    assert len(setups) == len(masked) == n
    assert {r["curve"] for r in setups} == {"secp256r1"} and {r["scheme"] for r in setups} == {MASK_SCHEME}
    assert all(r["weight_factor_unmasked"] and not r["flower_unmasks_it"] for r in masked)
    assert max(r["max_error"] for r in masked) < 2 * QUANTISATION
    expected = [g + np.mean([update_of(p)[i] for p in range(n)], axis=0) for i, g in enumerate(init)]
    for got, want in zip(seen[-1][1], expected, strict=True):
        np.testing.assert_allclose(got, want, atol=n * QUANTISATION)


def test_cohorts_come_from_the_os_csprng_and_reseeding_random_does_not_replay_them():
    import random
    from types import SimpleNamespace

    manager = compat.csprng_client_manager()
    for cid in range(50):
        manager.register(SimpleNamespace(cid=str(cid)))
    assert isinstance(manager.rng, random.SystemRandom)
    draws = []
    for _ in range(2):
        random.seed(0)  # Flower's own sampler would now repeat its cohort
        draws.append([p.cid for p in manager.sample(10)])
    assert len(set(draws[0])) == 10 and draws[0] != draws[1]  # 1 in C(50,10)*10! chance to collide
    assert manager.sample(51, min_num_clients=1) == []
