"""A SuperExec for a SuperNode whose ClientApp processes start warm: forked from a parent with torch loaded.

Every Deployment-Engine message starts a fresh ClientApp process. Importing
torch, torchaudio and Opacus costs about 8 s of CPU on this machine, so with the
stock SuperExec a SecAgg+ round of 3 devices on 2 cores spends most of its time
importing. This SuperExec is Flower's own (same task polling, same
``flwr-clientapp`` entry point and arguments) with one change: a ClientApp task
is run in a child *forked* from this process, which imported the heavy
third-party libraries once at start-up. The child still loads the app from the
run's FAB (fl-ser's own modules are deliberately not pre-imported), handles one
message and exits, as Flower's process isolation intends; other task types are
launched as usual.

Started by :mod:`clients.supernode` with ``--warm``; it runs the SuperNode with
``--isolation process`` and this executor beside it (POSIX only).
"""

from __future__ import annotations

import os
import signal
import sys

# torch._dynamo: torch.optim imports it on an optimizer's first construction (~2.7 s of CPU per local training).
WARM_IMPORTS = ("numpy", "scipy.stats", "torch", "torch._dynamo", "torchaudio", "opacus", "omegaconf", "hydra.utils",
                "flwr.supernode.cli", "flwr.client", "flwr.server")


class ForkExecutor:
    """Flower's SubprocessExecutor, except that ClientApp tasks run in a fork of this warm process."""

    def __init__(self):
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished children

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type=None, **kwargs) -> None:
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        args = ["flwr-clientapp", "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if os.fork() == 0:  # the child: become a ClientApp process, never return into the executor loop
            code = 1
            try:
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                from flwr.supernode.cli import flwr_clientapp

                sys.argv = args
                flwr_clientapp()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return LaunchResult.accepted()

    def close(self) -> None:
        self.fallback.close()

    def reconcile(self) -> None:
        self.fallback.reconcile()


def main() -> None:
    """``python -m clients.warm_superexec [flower-superexec options]``."""
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    superexec.get_executor = lambda *args, **kwargs: ForkExecutor()
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
