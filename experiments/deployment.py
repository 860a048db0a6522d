"""Run an experiment on Flower's Deployment Engine: submit it to a running SuperLink and follow it to the end.

``python -m experiments.train federation=deployment federation.superlink=HOST:PORT
federation.root_certificates=LAB/ca/ca.crt`` (or ``experiments.lab rehearse``)
resolves and checks the config exactly as for simulation, then:

1. writes a private Flower CLI home in the run dir (``<run dir>/.flwr``) whose one
   connection, ``fl-ser``, points at the SuperLink over TLS;
2. submits this repository as the Flower App with ``flwr run``, the resolved
   config travelling in the run config (:mod:`fl_ser.run_config`);
3. follows the run through the SuperLink's Control API
   (:class:`fl_ser.flower_compat.RunFollower`), printing each round as the
   ServerApp records it, until it finishes, fails or times out (then it is
   stopped), and returns the ServerApp's ``summary.json``.

The ServerApp runs on the SuperLink's machine and writes the run dir there; for
a rehearsal that is this machine.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
from omegaconf import DictConfig

from fl_ser.run_config import RUN_CONFIG_KEY, encode

log = logging.getLogger("fl_ser")

APP_ROOT = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml's [tool.flwr.app]
CONNECTION = "fl-ser"
POLL_S = 1.0


class DeploymentError(RuntimeError):
    """The run could not be submitted or did not finish; the message says what happened and where to look."""


def flwr_env(run_dir: Path, superlink: str, root_certificates: str | Path) -> dict[str, str]:
    """Environment for the Flower CLI: its own home in the run dir, with one TLS connection to the SuperLink."""
    ca = Path(root_certificates).expanduser().resolve()
    if not ca.is_file():
        raise DeploymentError(f"federation.root_certificates={root_certificates}: no such file. Give the lab's CA "
                              "certificate (LAB/ca/ca.crt, made by `python -m experiments.lab prepare`).")
    home = run_dir / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    conf = {"superlink": {"default": CONNECTION, CONNECTION: {"address": superlink, "root-certificates": str(ca)}}}
    (home / "config.toml").write_text(tomli_w.dumps(conf))
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def flwr_cli(args: list[str], env: dict[str, str], what: str, timeout: float = 120) -> dict:
    """Run one ``flwr`` CLI command with JSON output; a failure names the command and Flower's own message."""
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = proc.stdout.strip()
    try:
        reply = json.loads(out[out.index("{"):]) if "{" in out else {}
    except ValueError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success", False):
        detail = reply.get("error-message") or (proc.stderr.strip() or out)[-2000:]
        raise DeploymentError(f"{what} failed (`flwr {' '.join(args)}`, exit {proc.returncode}): {detail}")
    return reply


def submit(cfg: DictConfig, env: dict[str, str]) -> int:
    """Submit the experiment as a Flower run; returns its run id."""
    run_dir = Path(cfg.run_dir)
    overrides = run_dir / "run_config.toml"
    overrides.write_text(tomli_w.dumps({RUN_CONFIG_KEY: encode(cfg)}))
    reply = flwr_cli(["run", str(APP_ROOT), CONNECTION, "--run-config", str(overrides)], env, "submitting the run")
    return int(reply["run-id"])


def follow(cfg: DictConfig, run_id: int, env: dict[str, str], on_poll=None) -> dict:
    """Wait for the run to finish, printing rounds as they land in the run dir; stop it on timeout."""
    from fl_ser.flower_compat import RunFollower

    run_dir = Path(cfg.run_dir)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    deadline = time.monotonic() + float(cfg.federation.run_timeout_s)
    follower = RunFollower(env["FLWR_HOME"], CONNECTION)
    shown = 0
    try:
        while True:
            status, sub, details = follower.status(run_id)
            shown = _show_rounds(run_dir, shown, int(cfg.rounds))
            if status == "finished":
                break
            if on_poll is not None:
                on_poll()
            if time.monotonic() > deadline:
                flwr_cli(["stop", str(run_id), CONNECTION], env, f"stopping run {run_id}")
                raise DeploymentError(f"run {run_id} did not finish within federation.run_timeout_s="
                                      f"{cfg.federation.run_timeout_s}; it was stopped. Partial results: {run_dir}")
            time.sleep(POLL_S)
    finally:
        follower.close()
    summary = run_dir / "summary.json"
    if sub != "completed" or not summary.is_file():
        raise DeploymentError(f"run {run_id} finished as {sub!r} ({details or 'no details'}) without a summary. "
                              f"The ServerApp's log: `FLWR_HOME={env['FLWR_HOME']} flwr log {run_id} {CONNECTION} "
                              f"--show`; partial results: {run_dir}")
    return json.loads(summary.read_text())


def _show_rounds(run_dir: Path, shown: int, total_rounds: int) -> int:
    """Print the rounds the ServerApp has recorded since the last poll (progress for long runs)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return shown
    from server.records import round_line

    text = path.read_text()
    rows = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: the ServerApp may be appending the next one
    if len(rows) < shown:  # a resumed run rewrote the file without the round that was in flight
        shown = 0
    for line in rows[shown:]:
        if line.strip():
            print(round_line(json.loads(line), total_rounds), flush=True)
    return len(rows)


def run_deployment(cfg: DictConfig, on_poll=None) -> dict:
    """Submit the resolved experiment to the configured SuperLink and return its summary."""
    fed = cfg.federation
    env = flwr_env(Path(cfg.run_dir), str(fed.superlink), fed.root_certificates)
    run_id = submit(cfg, env)
    print(f"fl-ser: submitted run {run_id} to SuperLink {fed.superlink}", flush=True)
    return {**follow(cfg, run_id, env, on_poll), "flower_run_id": run_id}
