"""Devices' fit replies checked against the global model before any strategy aggregates them, and reported.

:class:`ReplyCheck` wraps the server's strategy (outside
:class:`server.user_dp.UserLevelDP` when that is used, so nothing malformed
reaches the noised mean). A result whose arrays do not match the global model
that round sent out (their number, shapes, a float32/float64 dtype, all
finite) is dropped with its reason logged: one NaN or one mis-shaped array
from one device would otherwise corrupt the aggregate for everyone. After each
round :attr:`ReplyCheck.last_round` reports who was sampled, who was dropped
and why (a :class:`~fl_ser.round_report.RoundReport` for the ``fit`` stage:
public causes and counts only, no device data). With plain aggregation
that is the whole round; under SecAgg+ every result carries the same unmasked
aggregate, and :attr:`fl_ser.flower_compat.SecAggPlus.round_report` is the
report that says who dropped at which stage.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import Strategy

from fl_ser.round_report import NO_REPLY, RoundReport, failure_cause
from server.wrapped_strategy import WrappedStrategy

log = logging.getLogger("fl_ser.server")

FLOAT_DTYPES = (np.float32, np.float64)


class MalformedUpdate(RuntimeError):
    """A device's fit result that did not match the global model; passed on to the strategy as a failure."""


def update_problem(arrays: list[np.ndarray], shapes: list[tuple[int, ...]]) -> str | None:
    """What is wrong with an update (None: float32/float64 arrays of ``shapes``, all finite)."""
    if len(arrays) != len(shapes):
        return f"{len(arrays)} arrays, the model has {len(shapes)}"
    wrong = [i for i, (a, s) in enumerate(zip(arrays, shapes, strict=True)) if a.shape != s]
    if wrong:
        i = wrong[0]
        return f"array {i} has shape {arrays[i].shape}, the model's is {shapes[i]}"
    dtypes = sorted({str(a.dtype) for a in arrays if a.dtype not in FLOAT_DTYPES})
    if dtypes:
        return f"arrays in {', '.join(dtypes)}, not float32 or float64"
    if not all(np.isfinite(a).all() for a in arrays):
        return "non-finite values (NaN or infinity)"
    return None


class ReplyCheck(WrappedStrategy):
    """Wrap a strategy: pass on only fit results that match the global model, and report each round's replies."""

    def __init__(self, strategy: Strategy):
        super().__init__(strategy)
        self._shapes: list[tuple[int, ...]] = []
        self._report = RoundReport()

    def __repr__(self) -> str:
        return f"ReplyCheck({self.strategy!r})"

    @property
    def last_round(self) -> dict:
        """The last round's fit report (:class:`~fl_ser.round_report.RoundReport` as a JSON-able dict, node ids as
        ints); until the round's results arrive it names only the sampled devices."""
        return self._report.as_dict()

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self._shapes = [a.shape for a in parameters_to_ndarrays(parameters)]
        self._report = RoundReport(sampled=[proxy.node_id for proxy, _ in instructions])
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        report = self._report
        kept, rejected = [], []
        problems: dict[int, str | None] = {}  # under SecAgg+ every result holds the same aggregate: check it once
        for proxy, res in results:
            key = id(res.parameters)
            if key not in problems:
                problems[key] = update_problem(parameters_to_ndarrays(res.parameters), self._shapes)
            problem = problems[key]
            if problem is None:
                kept.append((proxy, res))
                continue
            log.warning("round %s: device %s's update is dropped, it does not match the global model: %s (check "
                        "that device's fl-ser version and its link)", server_round, proxy.node_id, problem)
            report.reject("fit", proxy.node_id, problem)
            rejected.append(MalformedUpdate(f"device {proxy.node_id}: {problem}"))
        for failure in failures:
            report.failure_causes[failure_cause(failure)] += 1
        unanswered = len(report.sampled) - len(results) - len(failures)
        if unanswered > 0:
            report.failure_causes[NO_REPLY] += unanswered
        report.participants = [proxy.node_id for proxy, _ in kept]
        done = set(report.participants) | set(report.malformed)
        report.dropped.setdefault("fit", []).extend(n for n in report.sampled if n not in done)
        if not kept:
            report.halted_at = "fit"
            return None, {}
        return self.strategy.aggregate_fit(server_round, kept, [*failures, *rejected])

