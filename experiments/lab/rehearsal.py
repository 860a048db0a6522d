"""A lab rehearsal on this machine: one SuperLink and one SuperNode per device on loopback, TLS and node auth on.

Uses a lab folder from ``prepare`` exactly as a real lab would: the SuperLink
serves the lab's certificate and admits only the enrolled device keys
(registered with ``flwr supernode register``); each SuperNode checks the
SuperLink against the lab CA and signs in with its own key. Each device holds
one training speaker of the experiment's corpus (``partition-id``) and keeps its
model store, report and privacy ledger (``privacy/``) in
``<run dir>/devices/<device>/``. The experiment is then submitted and followed
as in :mod:`experiments.deployment`.

``<run dir>/lab/`` gets every process's log and ``rehearsal.json`` (devices and
their node ids, the faults injected, who was dropped, each device's report, the
key-leak check). Faults, injected between the follower's polls (:class:`FaultInjector`):

* ``drop`` (:class:`DeviceFault`) kills one device's SuperNode process tree while
  it trains in a round, to rehearse a dropout;
* ``restart`` kills it the same way and starts it again with the same command
  line, device dir (so the same ledger) and key. Flower 1.42 will not activate a
  node the SuperLink still counts as online (until two heartbeat intervals after
  its last heartbeat: 20 s with clients.supernode's 10 s heartbeat, 60 s with
  Flower's; the SuperNode exits with "[code: 2004] Failed to activate SuperNode",
  Flower's exit code 305), so the SuperNode is started
  again once ``flwr supernode list`` (asked every :data:`RESTART_POLL_S`) shows
  it offline; it comes back under the same node id (the id belongs to the
  enrolled key) and takes part from the next round it is sampled in;
* a :class:`ServerFault` SIGKILLs, once the ServerApp has checkpointed a round,
  either the ServerApp process (``flwr-serverapp``, under the SuperLink's
  SuperExec; the SuperLink and SuperNodes stay up) or the whole SuperLink with it,
  which is then started again with the same command. That SuperLink keeps its
  state in ``lab/superlink.db`` (``--database``): an in-memory SuperLink forgets
  the enrolled nodes when it restarts, and every SuperNode, refused, shuts down;
  with the database they reconnect (their own retries) under the same node ids.
  The dead Flower run is stopped (``flwr stop``; Flower still lists it as running
  and would fail it only after 60 s without a ServerApp heartbeat) and the
  experiment resumed (:func:`experiments.train.resumed`) as a new Flower run on
  the same SuperLink and SuperNodes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.deployment import CONNECTION, flwr_cli, flwr_env, run_deployment
from experiments.lab.pki import Lab, LabError
from experiments.lab.processes import Processes, flower_bin, free_port
from experiments.train import resumed
from server import checkpoint

# What each process logs once it can serve (a warm SuperExec logs its start only after its imports).
READY = {"superlink": ("Application startup complete",), "supernode": ("SuperNode ID", "Starting Flower SuperExec")}
FAULT_OPTIONS = {False: "--drop", True: "--restart"}  # DeviceFault.restart -> its command-line option
SERVER_FAULT_OPTIONS = {False: "--kill-server", True: "--kill-superlink"}  # ServerFault.superlink -> its option
RESTART_POLL_S = 5.0  # how often a killed device's node status is asked for until it may restart


@dataclass(frozen=True)
class DeviceFault:
    """Kill ``device``'s SuperNode process tree while it trains in round ``round`` (after the SecAgg+ key exchange,
    mid-round); with ``restart``, start it again with the same command line, device dir and key."""

    device: str
    round: int
    restart: bool = False

    @property
    def option(self) -> str:
        return FAULT_OPTIONS[self.restart]

    @classmethod
    def parse(cls, text: str, restart: bool = False) -> DeviceFault:
        """``DEVICE@ROUND``, the argument of the command line's ``--drop`` (or, with ``restart``, ``--restart``)."""
        match = re.fullmatch(r"(device-\d+)@(\d+)", text)
        if not match or int(match[2]) < 1:
            raise LabError(f"{FAULT_OPTIONS[restart]} {text!r}: expected DEVICE@ROUND with ROUND >= 1, e.g. "
                           "device-02@2")
        return cls(match[1], int(match[2]), restart)


@dataclass(frozen=True)
class ServerFault:
    """Once the ServerApp has checkpointed round ``after_round``, SIGKILL it, or with ``superlink`` the SuperLink
    and everything under it (then started again); the run is then resumed."""

    after_round: int
    superlink: bool = False

    @property
    def option(self) -> str:
        return SERVER_FAULT_OPTIONS[self.superlink]

    @classmethod
    def parse(cls, text: str, superlink: bool = False) -> ServerFault:
        """``ROUND``, the argument of ``--kill-server`` (or, with ``superlink``, ``--kill-superlink``)."""
        if not text.isdigit() or int(text) < 1:
            raise LabError(f"{SERVER_FAULT_OPTIONS[superlink]} {text!r}: expected a round number >= 1, e.g. 2")
        return cls(int(text), superlink)


class ServerKilled(Exception):
    """The rehearsal killed the ServerApp (a :class:`ServerFault`); the run is to be resumed."""


def devices_for(lab: Lab, num_devices: int) -> tuple[str, ...]:
    if len(lab.devices) < num_devices:
        raise LabError(f"the experiment has {num_devices} training speakers (one device each) but lab {lab.root} "
                       f"has {len(lab.devices)} device keys; prepare one with --devices {num_devices}, or lower "
                       "the number of speakers (e.g. data.num_speakers, partition.num_test_speakers)")
    return lab.devices[:num_devices]


def leaked_keys(lab: Lab, folder: Path) -> list[str]:
    """Files under ``folder`` that contain any private key of the lab (there must be none)."""
    secrets = [p.read_bytes().strip() for p in lab.secrets]
    bodies = [b"".join(s.splitlines()[1:-1])[:64] for s in secrets]  # the key material, wherever line breaks fall
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            flat = data.replace(b"\n", b"").replace(b"\\n", b"")
            if any(s in data for s in secrets) or any(b and b in flat for b in bodies):
                found.append(str(path.relative_to(folder)))
    return found


def start_superlink(procs: Processes, lab: Lab, port: int, log: Path, database: Path | None = None) -> None:
    """The lab's SuperLink on loopback: its TLS certificate, only enrolled SuperNodes admitted, its state in memory
    or in ``database`` (which survives a restart); waits until ready."""
    procs.start("superlink", [
        flower_bin("flower-superlink"), "--ssl-ca-certfile", str(lab.ca_cert),
        "--ssl-certfile", str(lab.server_cert), "--ssl-keyfile", str(lab.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        *(["--database", str(database)] if database else []),
    ], log)
    procs.wait_for_log("superlink", READY["superlink"], timeout=60)


def rehearse(cfg: DictConfig, lab: Lab, num_devices: int, faults: tuple[DeviceFault, ...] = (),
             server_fault: ServerFault | None = None, stock: bool = False) -> dict:
    """Start the lab on loopback, run the resolved experiment on it (injecting the device ``faults``; with a
    ``server_fault``, resuming it once after the kill), collect reports, stop everything.

    Devices run :mod:`clients.supernode` (short polls, warm ClientApp processes), or with ``stock`` Flower's
    own ``flower-supernode`` with its defaults (the baseline for round-time comparisons).
    """
    run_dir = Path(cfg.run_dir)
    logs = run_dir / "lab"
    devices = devices_for(lab, num_devices)
    check_faults(faults, server_fault, devices, int(cfg.rounds))
    port = int(str(cfg.federation.superlink).rsplit(":", 1)[1])
    env = flwr_env(run_dir, str(cfg.federation.superlink), lab.ca_cert)
    procs = Processes(env)
    record: dict = {"lab": str(lab.root), "superlink": str(cfg.federation.superlink), "devices": {},
                    "supernodes": "flower-supernode (stock)" if stock else "clients.supernode --warm", "faults": []}
    t0 = time.monotonic()
    try:
        database = logs / "superlink.db" if server_fault and server_fault.superlink else None  # survives a restart
        start_superlink(procs, lab, port, logs / "superlink.log", database)
        for i, device in enumerate(devices):
            reply = flwr_cli(["supernode", "register", str(lab.enrolled_key(device)), CONNECTION, "--name", device],
                             env, f"enrolling {device}")
            device_dir = run_dir / "devices" / device
            device_dir.mkdir(parents=True, exist_ok=True)
            record["devices"][device] = {"node_id": str(reply["node-id"]), "device_dir": str(device_dir)}
            node_config = (f'partition-id={i} num-partitions={num_devices} device-dir="{device_dir}" '
                           f'ckks-key="{lab.ckks_key(device)}"')
            launcher = [flower_bin("flower-supernode")] if stock else [sys.executable, "-m", "clients.supernode",
                                                                        "--warm"]
            procs.start(device, [
                *launcher, "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(lab.device_dir(device) / "ca.crt"),
                "--auth-supernode-private-key", str(lab.device_key(device)), "--node-config", node_config,
                "--port", str(free_port()), "--max-retries", "10",
            ], logs / f"supernode-{device}.log", env={**env, "FLWR_HOME": str(device_dir / ".flwr")})
        for device in devices:
            procs.wait_for_log(device, READY["supernode"], timeout=120)
        record["startup_s"] = round(time.monotonic() - t0, 2)
        print(f"fl-ser lab: SuperLink on 127.0.0.1:{port} (TLS, node auth) with {num_devices} enrolled SuperNodes, "
              f"up in {record['startup_s']:.1f} s; logs in {logs}", flush=True)
        injector = FaultInjector(procs, env, run_dir, record, faults, server_fault, t0)
        try:
            summary = run_deployment(cfg, on_poll=injector)
        except ServerKilled:
            resumed_cfg = resumed(OmegaConf.create({"resume": str(run_dir)}), [])
            print(f"fl-ser lab: resuming {run_dir} as a new Flower run on the same SuperLink and SuperNodes",
                  flush=True)
            summary = run_deployment(resumed_cfg, on_poll=injector)
            record["server_kill"]["resumed_flower_run_id"] = summary["flower_run_id"]
    finally:
        procs.stop()
    for fault in record["faults"]:
        if fault["restarted_at_s"] is not None:
            ids = re.findall(r"SuperNode ID: (\d+)", procs.started[fault["device"]].output())
            fault["node_id_after_restart"] = ids[0] if ids else None
    node_to_device = {info["node_id"]: d for d, info in record["devices"].items()}
    record["dropped"] = {r: sorted(node_to_device.get(n, n) for nodes in stages.values() for n in nodes)
                         for r, stages in summary["dropouts"].items()}
    for info in record["devices"].values():
        report = Path(info["device_dir"]) / "report.json"
        info["report"] = json.loads(report.read_text()) if report.is_file() else None
    record["leaked_private_keys"] = leaked_keys(lab, run_dir)
    record["wall_s"] = round(time.monotonic() - t0, 2)
    (logs / "rehearsal.json").write_text(json.dumps(record, indent=2) + "\n")
    if record["leaked_private_keys"]:
        raise LabError(f"private key material found in {record['leaked_private_keys']} under {run_dir}")
    return {**summary, "rehearsal": record}


def check_faults(faults: tuple[DeviceFault, ...], server_fault: ServerFault | None, devices: tuple[str, ...],
                 rounds: int) -> None:
    """Refuse faults the rehearsal cannot inject: unknown devices, two faults on one device, rounds past the run."""
    for fault in faults:
        if fault.device not in devices:
            raise LabError(f"{fault.option} {fault.device}@{fault.round}: not one of this rehearsal's devices "
                           f"{list(devices)}")
        if fault.round > rounds:
            raise LabError(f"{fault.option} {fault.device}@{fault.round}: the run has only {rounds} rounds")
    twice = sorted({f.device for f in faults if sum(g.device == f.device for g in faults) > 1})
    if twice:
        raise LabError(f"{', '.join(twice)}: one fault per device (--drop or --restart, once)")
    if server_fault is not None and not 1 <= server_fault.after_round < rounds:
        raise LabError(f"{server_fault.option} {server_fault.after_round}: give a round from 1 to {rounds - 1} "
                       f"(rounds={rounds}), so that the resumed run has a round left to run")


def training_rounds(device_dir: str | Path) -> list[int]:
    """The rounds of the training events in a device's privacy ledger (``privacy/ledger.json``), in order."""
    path = Path(device_dir) / "privacy" / "ledger.json"
    if not path.is_file():
        return []
    return [e["round"] for e in json.loads(path.read_text())["events"] if e["kind"] == "training"]


class FaultInjector:
    """Called between the follower's polls: fail fast if a device died on its own; inject the requested faults
    (each once) and note them in the rehearsal record (``faults``, ``server_kill``; seconds since ``t0``)."""

    def __init__(self, procs: Processes, env: dict[str, str], run_dir: Path, record: dict,
                 faults: tuple[DeviceFault, ...], server_fault: ServerFault | None, t0: float):
        self.procs, self.env, self.run_dir, self.record, self.t0 = procs, env, run_dir, record, t0
        self.pending = list(faults)  # not injected yet
        self.down: dict[str, dict] = {}  # device -> its fault record, while its SuperNode is killed
        self.next_status_check = 0.0
        self.server_fault = server_fault  # None once injected
        self.state_mtime, self.checkpointed = 0.0, 0

    def __call__(self) -> None:
        for fault in [f for f in self.pending if _training(self.procs, f)]:
            self._kill_device(fault)
        if any(f["kind"] == "restart" for f in self.down.values()) and time.monotonic() >= self.next_status_check:
            self._restart_offline()
        dead = [d for d in self.procs.dead() if d not in self.down]
        if dead:
            raise LabError(f"{', '.join(dead)} exited unexpectedly; see {self.run_dir / 'lab'}")
        if self.server_fault is not None and self._checkpointed() >= self.server_fault.after_round:
            self._kill_server(self.server_fault)

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def _kill_device(self, fault: DeviceFault) -> None:
        device_dir = self.record["devices"][fault.device]["device_dir"]
        before = training_rounds(device_dir)
        self.procs.kill(fault.device)
        self.pending.remove(fault)
        entry = {"device": fault.device, "kind": "restart" if fault.restart else "drop", "round": fault.round,
                 "killed_at_s": self._elapsed(), "ledger_training_rounds_before_kill": before,
                 "restarted_at_s": None}
        self.record["faults"].append(entry)
        self.down[fault.device] = entry
        print(f"fl-ser lab: killed {fault.device}'s SuperNode while it trains in round {fault.round}"
              + (" (it restarts once the SuperLink counts it offline)" if fault.restart else ""), flush=True)

    def _restart_offline(self) -> None:
        """Start each killed device that is to restart again once the SuperLink no longer counts it online."""
        nodes = flwr_cli(["supernode", "list", CONNECTION], self.env, "listing the SuperNodes")["nodes"]
        status = {n["node-id"]: n["status"] for n in nodes}
        for device, entry in list(self.down.items()):
            if entry["kind"] == "restart" and status.get(self.record["devices"][device]["node_id"]) != "online":
                self.procs.restart(device)
                entry["restarted_at_s"] = self._elapsed()
                del self.down[device]
                print(f"fl-ser lab: restarted {device}'s SuperNode (same command, device dir and key)", flush=True)
        self.next_status_check = time.monotonic() + RESTART_POLL_S

    def _checkpointed(self) -> int:
        """The last round the ServerApp saved its state after (0: none yet); the state is read when it changes."""
        path = self.run_dir / checkpoint.STATE_FILE
        if path.is_file() and path.stat().st_mtime != self.state_mtime:
            self.state_mtime = path.stat().st_mtime
            self.checkpointed = checkpoint.load(self.run_dir).round
        return self.checkpointed

    def _kill_server(self, fault: ServerFault) -> None:
        """SIGKILL the ServerApp (or the SuperLink, then restarted), stop the dead Flower run, and raise
        :class:`ServerKilled` (the caller resumes)."""
        superlink = self.procs.started["superlink"]
        if fault.superlink:
            pids = [superlink.popen.pid]
            self.procs.kill("superlink")
            superlink.popen.wait(timeout=30)
        else:
            pids = self.procs.kill_descendants("superlink", "flwr-serverapp")
            if not pids:
                raise LabError(f"{fault.option} {fault.after_round}: no flwr-serverapp process under the SuperLink "
                               f"(pid {superlink.popen.pid}); see {self.run_dir / 'lab'}")
        killed_at = self._elapsed()
        checkpointed = checkpoint.load(self.run_dir).round  # what the resumed run continues from
        if fault.superlink:
            self.procs.restart("superlink")
            self.procs.wait_for_log("superlink", READY["superlink"], timeout=120)
        runs = flwr_cli(["ls", CONNECTION], self.env, "listing the runs")["runs"]
        running = [r for r in runs if not r["status"].startswith("finished")]
        for run in running:
            flwr_cli(["stop", run["run-id"], CONNECTION], self.env, f"stopping run {run['run-id']}")
        killed = "SuperLink" if fault.superlink else "ServerApp"
        self.record["server_kill"] = {
            "killed": killed, "after_round": fault.after_round, "checkpointed_round": checkpointed, "pids": pids,
            "killed_at_s": killed_at, "superlink_restarted_at_s": self._elapsed() if fault.superlink else None,
            "stopped_flower_runs": [r["run-id"] for r in running],
            "status_after_kill": {r["run-id"]: r["status"] for r in running}}
        self.server_fault = None
        print(f"fl-ser lab: killed the {killed} (pid {', '.join(map(str, pids))}) after the ServerApp checkpointed "
              f"round {checkpointed}{'; restarted it' if fault.superlink else ''}; stopped Flower run "
              f"{', '.join(r['run-id'] for r in running)}", flush=True)
        raise ServerKilled


def _training(procs: Processes, fault: DeviceFault) -> bool:
    """Whether the device has received round ``round``'s third SecAgg+ message (masked update = local training)."""
    received = re.findall(rf"ROUND {fault.round}\]\n[^\n]*Receiving: train message",
                          procs.started[fault.device].output())
    return len(received) >= 3


def loopback_federation(cfg: DictConfig, lab: Lab) -> DictConfig:
    """The deployment settings of a rehearsal: a fresh loopback port and the lab's CA."""
    fed = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "federation" / "deployment.yaml")
    fed.superlink = f"127.0.0.1:{free_port()}"
    fed.root_certificates = str(lab.ca_cert)
    given = cfg.federation if cfg.federation.get("engine") == "deployment" else {}
    for key in ("num_devices", "reply_timeout_s", "poll_interval_s", "run_timeout_s"):
        if key in given:
            fed[key] = given[key]
    return fed
