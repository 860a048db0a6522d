"""The Flower processes of a rehearsal: start each with its own log, watch them, and stop every one by PID.

Flower's SuperLink and SuperNodes start helper processes of their own (SuperExec,
ServerApp and ClientApp processes) in new sessions, so killing a process group
is not enough: :meth:`Processes.stop` collects every descendant of each process
it started (``psutil``) before terminating them, and kills what is left after a
grace period. It runs on normal exit, on errors and on Ctrl-C / SIGTERM.

For fault rehearsals a process tree can be killed at once (:meth:`Processes.kill`, a
device vanishing), started again with its own command line and environment
(:meth:`Processes.restart`, a device coming back), and a helper process found by
its program name among a started process's descendants and killed
(:meth:`Processes.kill_descendants`, e.g. the SuperLink's ``flwr-serverapp``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from experiments.deployment import DeploymentError

GRACE_S = 5.0


class ProcessError(DeploymentError):
    """A Flower process of the rehearsal failed to start or died; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (the venv), not whatever is first on PATH."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Started:
    name: str
    args: list[str]
    env: dict[str, str]
    popen: subprocess.Popen
    log: Path
    offset: int  # the log's size when this process started (a log is appended to across restarts and reruns)

    def output(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


@dataclass
class Processes:
    """Every process a rehearsal started, by name."""

    env: dict[str, str]
    started: dict[str, Started] = field(default_factory=dict)
    _seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant met while signalling

    def start(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Started:
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        env = env or self.env
        with open(log, "ab") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        self.started[name] = Started(name, args, env, popen, log, offset)
        return self.started[name]

    def restart(self, name: str) -> Started:
        """Start ``name`` again exactly as before (command line, environment, log appended to)."""
        old = self.started[name]
        if old.popen.poll() is None:
            raise ProcessError(f"{name} (pid {old.popen.pid}) is still running; kill it before restarting it")
        return self.start(name, old.args, old.log, old.env)

    def wait_for_log(self, name: str, texts: tuple[str, ...], timeout: float) -> None:
        """Block until the process's log shows all ``texts``; fail with its log's tail if it exits or times out."""
        proc = self.started[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(text in proc.output() for text in texts):
                return
            if proc.popen.poll() is not None:
                break
            time.sleep(0.1)
        state = "exited" if proc.popen.poll() is not None else f"did not get ready within {timeout:.0f} s"
        raise ProcessError(f"{name} {state}; the end of {proc.log}:\n{tail(proc.log)}")

    def dead(self) -> list[str]:
        return [n for n, p in self.started.items() if p.popen.poll() is not None]

    def kill(self, name: str) -> None:
        """Kill one process and everything it started, at once (a device vanishing mid-round)."""
        self._signal_tree(self.started[name].popen.pid, force=True)

    def kill_descendants(self, name: str, program: str) -> list[int]:
        """Kill, with everything they started, the descendants of ``name`` that run ``program`` (the file name of
        their executable or, for a script, of the script, e.g. ``flwr-serverapp``); returns their pids."""
        try:
            family = psutil.Process(self.started[name].popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for p in family:
            with contextlib.suppress(psutil.Error):
                if any(Path(word).name == program for word in p.cmdline()[:2]):
                    found.append(p.pid)
        for pid in found:
            self._signal_tree(pid, force=True)
        return found

    def stop(self) -> None:
        """Terminate every started process and its descendants; kill whatever outlives the grace period."""
        for name in reversed(list(self.started)):  # devices first, the SuperLink last
            self._signal_tree(self.started[name].popen.pid, force=False)
        deadline = time.monotonic() + GRACE_S
        for proc in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for p in self._seen.values():  # descendants too, even if re-parented meanwhile (psutil guards PID reuse)
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1.0)

    def _signal_tree(self, pid: int, force: bool) -> None:
        try:
            root = psutil.Process(pid)
            family = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            return
        self._seen.update({p.pid: p for p in family if p.pid != os.getpid()})
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill() if force else p.terminate()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
