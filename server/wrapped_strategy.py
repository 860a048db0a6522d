"""A strategy that wraps another and delegates every step it does not change (fl-ser's server-side wrappers).

:class:`server.user_dp.UserLevelDP` changes ``configure_fit`` and
``aggregate_fit`` (calibrated noise on a uniform mean) and
:class:`server.replies.ReplyCheck` ``configure_fit`` and ``aggregate_fit``
(malformed results dropped, each round reported); everything else is the inner
strategy's. The inner strategy is ``.strategy`` (:mod:`server.checkpoint` finds
the server optimiser through it).
"""

from __future__ import annotations

from flwr.server.strategy import Strategy


class WrappedStrategy(Strategy):
    """Delegates every step to ``strategy``; subclasses override the steps they change."""

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)
