"""Flower's in-process simulation, with fl-ser's message dispatch (:func:`fl_ser.flower_compat.proportional_dispatch`).

Flower 1.42's Simulation Runtime hands messages to its workers from a thread
that, every 0.1 s, scans every stored message once per virtual SuperNode; with
10,000 nodes that dominated large simulations, four times a round with SecAgg+.
:func:`run_simulation` runs Flower's ``run_simulation`` with fl-ser's one-scan
dispatcher installed (see :mod:`fl_ser.flower_compat`) and shuts Ray down
afterwards.
"""

from __future__ import annotations

import warnings


def run_simulation(server_app, client_app, num_supernodes: int, backend_config: dict, verbose: bool = False) -> None:
    """Flower's ``run_simulation`` (deprecated in favour of ``flwr run``, still its in-process path) with the
    proportional dispatch installed; Ray is shut down afterwards."""
    import ray
    from flwr.simulation import run_simulation as flower_run_simulation

    from fl_ser.flower_compat import proportional_dispatch

    try:
        with proportional_dispatch(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            flower_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                                  backend_config=backend_config, verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()
