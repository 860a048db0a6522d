"""``python -m clients.supernode [--warm] [flower-supernode options]``: Flower's SuperNode, with shorter waits.

Flower 1.42's SuperNode sleeps 3 s whenever the SuperLink has no message for it,
and its SuperExec looks for new work every 1 s. A SecAgg+ round is four
exchanges, so those waits alone cost a 3-device round over 10 s on loopback.
This launcher runs the unmodified ``flower-supernode`` with both waits capped at
``FL_SER_POLL_INTERVAL_S`` seconds (default 0.2; the SuperNode's through
:func:`fl_ser.flower_compat.install_capped_sleep`). Each idle poll is one small
HTTPS request to the SuperLink: keep the default Flower SuperNode (3 s) for
large fleets, use this where round latency matters (lab rehearsals, small labs).

It also heartbeats every ``FL_SER_HEARTBEAT_S`` seconds (default 10, the least the SuperLink accepts; Flower's is
30: :func:`fl_ser.flower_compat.install_heartbeat_interval`), so the SuperLink counts a device that died offline
after 20 s instead of 60 (it stops sampling it, and a restarted device is let back in sooner), for one small
request every ~4 s.

``--warm`` runs the SuperNode with ``--isolation process`` and
:mod:`clients.warm_superexec` beside it, so ClientApp processes start without
re-importing torch (POSIX only).
"""

from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_POLL_INTERVAL_S = 0.2
DEFAULT_HEARTBEAT_S = 10.0


def main() -> None:
    interval = float(os.environ.get("FL_SER_POLL_INTERVAL_S", DEFAULT_POLL_INTERVAL_S))
    if not 0 < interval <= 3:
        raise SystemExit(f"FL_SER_POLL_INTERVAL_S={interval}: use a number of seconds in (0, 3]")
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(interval))  # Flower's own setting
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fl_ser.flower_compat import FlowerCompatError, install_capped_sleep, install_heartbeat_interval

    install_capped_sleep(interval)  # the pull / push waits of the SuperNode's main loop
    heartbeat = float(os.environ.get("FL_SER_HEARTBEAT_S", DEFAULT_HEARTBEAT_S))
    try:
        install_heartbeat_interval(heartbeat)
    except FlowerCompatError as err:
        raise SystemExit(f"FL_SER_HEARTBEAT_S={heartbeat}: {err}") from err
    if "--warm" in sys.argv:
        sys.argv.remove("--warm")
        start_warm_executor()
    flower_supernode()


def start_warm_executor() -> subprocess.Popen:
    """Run the SuperNode with process isolation and a warm SuperExec on its (loopback) runtime API."""
    from fl_ser.flower_compat import supernode_args

    args = supernode_args(sys.argv[1:])
    if "--isolation" in sys.argv and args.isolation != "process":
        raise SystemExit("--warm runs the ClientApps itself: drop --isolation, or use --isolation process")
    if "--isolation" not in sys.argv:
        sys.argv += ["--isolation", "process"]
    return subprocess.Popen([sys.executable, "-m", "clients.warm_superexec", "--runtime-api-address",
                             f"{args.host}:{args.port}", "--insecure", "--parent-pid", str(os.getpid())])


if __name__ == "__main__":
    main()
