"""Flower's simulation engine, with its message dispatch made proportional to the messages waiting.

Flower 1.42's Simulation Runtime hands messages to its workers from a thread
that, every 0.1 s, asks the in-memory LinkState for the next message of *each*
virtual SuperNode in turn; each of those calls scans (and re-validates) every
stored message. A pass therefore costs nodes x messages under the state's lock:
with 10,000 nodes and 100 sampled that is 10^6 checks every 0.1 s, which
dominated large simulations, and with SecAgg+ (four exchanges a round) it was
paid four times a round.

:func:`run_simulation` installs :func:`dispatch_messages` in its place before
starting Flower's ``run_simulation``: one scan of the waiting messages per pass,
the same validity checks (Flower's ``_check_stored_messages``: expiry and
federation membership), the same at-most-one message per node per pass, and a
shorter pass interval, which is affordable once a pass is cheap. Everything
else is Flower's own. The patch relies on ``InMemoryLinkState`` internals and
is valid for the pinned flwr 1.42.0; another LinkState gets Flower's dispatch.
"""

from __future__ import annotations

import threading
import warnings
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

DISPATCH_INTERVAL_S = 0.01
FLOWER_DISPATCH = vce_api.add_messages_to_queue


def dispatch_messages(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Put each virtual node's next undelivered message in the workers' queue, until ``f_stop`` is set."""
    if not isinstance(state, InMemoryLinkState):
        return FLOWER_DISPATCH(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with state.lock:
            waiting = {mid for mid, m in state.message_ins_store.items()
                       if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes_mapping}
            state._check_stored_messages(waiting)  # drops expired and out-of-federation messages, as Flower does
            batch, nodes = [], set()
            for mid, m in state.message_ins_store.items():  # insertion order: a node's oldest message first
                if mid in waiting and m.metadata.dst_node_id not in nodes:
                    nodes.add(m.metadata.dst_node_id)
                    batch.append(m)
            delivered_at = now().isoformat()
            for m in batch:
                m.metadata.delivered_at = delivered_at
        for m in batch:
            queue.put(m)
        f_stop.wait(DISPATCH_INTERVAL_S)


def run_simulation(server_app, client_app, num_supernodes: int, backend_config: dict, verbose: bool = False) -> None:
    """Flower's ``run_simulation`` (deprecated in favour of ``flwr run``, still its in-process path) with the
    proportional dispatch installed; Ray is shut down afterwards."""
    import ray
    from flwr.simulation import run_simulation as flower_run_simulation

    vce_api.add_messages_to_queue = dispatch_messages
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            flower_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                                  backend_config=backend_config, verbose_logging=verbose)
    finally:
        vce_api.add_messages_to_queue = FLOWER_DISPATCH
        if ray.is_initialized():
            ray.shutdown()
