"""The server's state after every round, so that a killed run continues where it stopped (``resume=RUN_DIR``).

``checkpoints/state.npz`` is replaced atomically (:func:`fl_ser.durable.write_atomically`)
after each round's evaluation and holds everything the next round depends on:

* the global model (the round's ``checkpoints/round_NNN.npz`` holds it too, for people);
* the server optimiser's state: FedAdam's / FedYogi's / FedAdagrad's moments
  ``m_t`` and ``v_t`` and their ``current_weights`` (FedAvg and FedProx keep none);
* the round counter, from which the user-level accountant's rounds follow;
* what the recorder has written (the rows of ``metrics.jsonl``, the largest
  epsilons, each device's participation), so a resumed run rewrites the metrics
  files from it: rows of a round that was in flight when the server died are
  dropped and that round runs again, so every round appears once.

Client sampling draws from the OS CSPRNG (:func:`fl_ser.flower_compat.csprng_client_manager`),
so there is no generator state to keep. The file loads without pickle: arrays and
one JSON string.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_ser.durable import write_atomically

STATE_FILE = Path("checkpoints") / "state.npz"
FORMAT = "fl-ser.server-state/1"
OPTIMISER_STATE = ("current_weights", "m_t", "v_t")  # flwr.server.strategy.FedOpt's (checked on restore)


class StateError(RuntimeError):
    """A run dir's server state cannot be used to resume; the message names the file and what to do."""


@dataclass
class ServerState:
    round: int
    params: list[np.ndarray]
    records: dict
    optimiser: dict[str, list[np.ndarray] | None] = field(default_factory=dict)


def save(run_dir: str | Path, state: ServerState) -> None:
    arrays = {f"params.{i}": a for i, a in enumerate(state.params)}
    for name, value in state.optimiser.items():
        arrays.update({f"{name}.{i}": a for i, a in enumerate(value or [])})
    meta = {"format": FORMAT, "round": state.round, "records": state.records,
            "optimiser": {k: None if v is None else len(v) for k, v in state.optimiser.items()},
            "num_params": len(state.params)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    path = Path(run_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buf.getvalue())


def load(run_dir: str | Path) -> ServerState | None:
    """The state after the run's last completed round; None when no round completed."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            params = [f[f"params.{i}"] for i in range(meta["num_params"])]
            optimiser = {k: None if n is None else [f[f"{k}.{i}"] for i in range(n)]
                         for k, n in meta["optimiser"].items()}
    except (OSError, ValueError, KeyError) as err:
        raise StateError(f"{path} cannot be read ({err}): this run cannot be resumed from it. Start a new run "
                         "in a new run dir; the round checkpoints in its folder hold the global models.") from None
    return ServerState(int(meta["round"]), params, meta["records"], optimiser)


def _innermost(strategy):
    from server.wrapped_strategy import WrappedStrategy

    while isinstance(strategy, WrappedStrategy):  # UserLevelDP, the reply check
        strategy = strategy.strategy
    return strategy


def optimiser_state(strategy) -> dict[str, list[np.ndarray] | None]:
    """The server optimiser's state (FedOpt's moments and weights), or {} for a stateless strategy."""
    from flwr.server.strategy import FedOpt

    inner = _innermost(strategy)
    if not isinstance(inner, FedOpt):
        return {}
    return {name: None if getattr(inner, name) is None else [np.asarray(a) for a in getattr(inner, name)]
            for name in OPTIMISER_STATE}


def restore_optimiser(strategy, state: dict[str, list[np.ndarray] | None]) -> None:
    """Put a saved optimiser state back; a mismatch (another strategy than the saved one) is an error."""
    from flwr.server.strategy import FedOpt

    inner = _innermost(strategy)
    if bool(state) != isinstance(inner, FedOpt):
        raise StateError(f"the saved server state {'has' if state else 'has no'} optimiser moments but the "
                         f"strategy is {type(inner).__name__}: resume with the run's own config.yaml")
    for name in OPTIMISER_STATE if state else ():
        if not hasattr(inner, name):
            raise StateError(f"{type(inner).__name__} has no attribute {name!r}: flwr's FedOpt changed; see "
                             "server/checkpoint.py")
        setattr(inner, name, state[name])
