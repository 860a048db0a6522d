"""A lab rehearsal on this machine: one SuperLink and one SuperNode per device on loopback, TLS and node auth on.

Uses a lab folder from ``prepare`` exactly as a real lab would: the SuperLink
serves the lab's certificate and admits only the enrolled device keys
(registered with ``flwr supernode register``); each SuperNode checks the
SuperLink against the lab CA and signs in with its own key. Each device holds
one training speaker of the experiment's corpus (``partition-id``) and keeps its
model store and report in ``<run dir>/devices/<device>/``. The experiment is then
submitted and followed as in :mod:`experiments.deployment`.

``<run dir>/lab/`` gets every process's log and ``rehearsal.json`` (devices and
their node ids, who was dropped, each device's report, the key-leak check).
``drop`` kills one device's SuperNode as a round starts, to rehearse a dropout.
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

# What each process logs once it can serve (a warm SuperExec logs its start only after its imports).
READY = {"superlink": ("Application startup complete",), "supernode": ("SuperNode ID", "Starting Flower SuperExec")}


@dataclass(frozen=True)
class Dropout:
    """Kill ``device``'s SuperNode while it trains in round ``round``: after the SecAgg+ key exchange, mid-round."""

    device: str
    round: int

    @classmethod
    def parse(cls, text: str) -> Dropout:
        match = re.fullmatch(r"(device-\d+)@(\d+)", text)
        if not match:
            raise LabError(f"--drop {text!r}: expected DEVICE@ROUND, e.g. device-02@2")
        return cls(match[1], int(match[2]))


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


def start_superlink(procs: Processes, lab: Lab, port: int, log: Path) -> None:
    """The lab's SuperLink on loopback: its TLS certificate, only enrolled SuperNodes admitted; waits until ready."""
    procs.start("superlink", [
        flower_bin("flower-superlink"), "--ssl-ca-certfile", str(lab.ca_cert),
        "--ssl-certfile", str(lab.server_cert), "--ssl-keyfile", str(lab.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
    ], log)
    procs.wait_for_log("superlink", READY["superlink"], timeout=60)


def rehearse(cfg: DictConfig, lab: Lab, num_devices: int, dropout: Dropout | None = None,
             stock: bool = False) -> dict:
    """Start the lab on loopback, run the resolved experiment on it, collect reports, stop everything.

    Devices run :mod:`clients.supernode` (short polls, warm ClientApp processes), or with ``stock`` Flower's
    own ``flower-supernode`` with its defaults (the baseline for round-time comparisons).
    """
    run_dir = Path(cfg.run_dir)
    logs = run_dir / "lab"
    devices = devices_for(lab, num_devices)
    if dropout is not None and dropout.device not in devices:
        raise LabError(f"--drop {dropout.device}: not one of this rehearsal's devices {list(devices)}")
    port = int(str(cfg.federation.superlink).rsplit(":", 1)[1])
    env = flwr_env(run_dir, str(cfg.federation.superlink), lab.ca_cert)
    procs = Processes(env)
    record: dict = {"lab": str(lab.root), "superlink": str(cfg.federation.superlink), "devices": {},
                    "supernodes": "flower-supernode (stock)" if stock else "clients.supernode --warm"}
    t0 = time.monotonic()
    try:
        start_superlink(procs, lab, port, logs / "superlink.log")
        for i, device in enumerate(devices):
            reply = flwr_cli(["supernode", "register", str(lab.enrolled_key(device)), CONNECTION, "--name", device],
                             env, f"enrolling {device}")
            device_dir = run_dir / "devices" / device
            device_dir.mkdir(parents=True, exist_ok=True)
            record["devices"][device] = {"node_id": str(reply["node-id"]), "device_dir": str(device_dir)}
            node_config = f'partition-id={i} num-partitions={num_devices} device-dir="{device_dir}"'
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
        summary = run_deployment(cfg, on_poll=_watch(procs, run_dir, dropout, record))
    finally:
        procs.stop()
    node_to_device = {info["node_id"]: d for d, info in record["devices"].items()}
    record["dropped"] = {r: [node_to_device.get(n, n) for n in nodes] for r, nodes in summary["dropouts"].items()}
    for info in record["devices"].values():
        report = Path(info["device_dir"]) / "report.json"
        info["report"] = json.loads(report.read_text()) if report.is_file() else None
    record["leaked_private_keys"] = leaked_keys(lab, run_dir)
    record["wall_s"] = round(time.monotonic() - t0, 2)
    (logs / "rehearsal.json").write_text(json.dumps(record, indent=2) + "\n")
    if record["leaked_private_keys"]:
        raise LabError(f"private key material found in {record['leaked_private_keys']} under {run_dir}")
    return {**summary, "rehearsal": record}


def _watch(procs: Processes, run_dir: Path, dropout: Dropout | None, record: dict):
    """Called between polls: fail fast if a device died on its own; inject the requested dropout."""
    state = {"dropped": False}

    def check() -> None:
        if dropout is not None and not state["dropped"] and _training(procs, dropout):
            procs.kill(dropout.device)
            state["dropped"] = True
            record["injected_dropout"] = {"device": dropout.device, "round": dropout.round}
            print(f"fl-ser lab: killed {dropout.device}'s SuperNode while it trains in round {dropout.round}",
                  flush=True)
        dead = [d for d in procs.dead() if d != (dropout.device if state["dropped"] else None)]
        if dead:
            raise LabError(f"{', '.join(dead)} exited unexpectedly; see {run_dir / 'lab'}")

    return check


def _training(procs: Processes, dropout: Dropout) -> bool:
    """Whether the device has received round ``round``'s third SecAgg+ message (masked update = local training)."""
    received = re.findall(rf"ROUND {dropout.round}\]\n[^\n]*Receiving: train message",
                          procs.started[dropout.device].output())
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
