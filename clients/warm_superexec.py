"""A SuperExec for a SuperNode whose ClientApp processes start warm: forked from a parent with torch loaded.

Every Deployment-Engine message starts a fresh ClientApp process. Importing
torch, torchaudio and Opacus costs about 8 s of CPU on this machine, so with the
stock SuperExec a SecAgg+ round of 3 devices on 2 cores spends most of its time
importing. This SuperExec is Flower's own (same task polling, same
``flwr-clientapp`` entry point and arguments) with one change: a ClientApp task
is run in a child *forked* from this process, which imported the heavy
third-party libraries once at start-up (:class:`fl_ser.flower_compat.ForkExecutor`,
installed by :func:`~fl_ser.flower_compat.install_fork_executor`). The child
still loads the app from the run's FAB (fl-ser's own modules are dropped from the
child's ``sys.modules`` before it does), handles one message and exits, as
Flower's process isolation intends; other task types are launched as usual.

Started by :mod:`clients.supernode` with ``--warm``; it runs the SuperNode with
``--isolation process`` and this executor beside it (POSIX only).
"""

from __future__ import annotations

import sys

# torch._dynamo: torch.optim imports it on an optimizer's first construction (~2.7 s of CPU per local training).
WARM_IMPORTS = ("numpy", "scipy.stats", "torch", "torch._dynamo", "torchaudio", "opacus", "opendp.prelude", "omegaconf",
                "hydra.utils", "flwr.supernode.cli", "flwr.client", "flwr.server")


def main() -> None:
    """``python -m clients.warm_superexec [flower-superexec options]``."""
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    from fl_ser.flower_compat import install_fork_executor

    install_fork_executor()
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
