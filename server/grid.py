"""A Grid that waits for device replies with a short poll interval.

Flower 1.42's Deployment-Engine grid polls the SuperLink for replies every 3 s,
and a SecAgg+ round is four request/reply exchanges, so a round can never be
faster than several seconds of pure waiting. :class:`PromptGrid` wraps any grid
and re-implements ``send_and_receive`` on the grid's public ``push_messages`` /
``pull_messages`` with ``federation.poll_interval_s`` between polls; everything
else is delegated. Flower's in-memory (simulation) grid polls every 0.1 s,
which four exchanges a SecAgg+ round also feel, so simulation uses it too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from omegaconf import DictConfig


class PromptGrid(Grid):
    def __init__(self, grid: Grid, poll_interval_s: float):
        if poll_interval_s <= 0:
            raise ValueError(f"federation.poll_interval_s must be positive, got {poll_interval_s}")
        self.grid = grid
        self.poll_interval_s = poll_interval_s

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push the messages, then collect replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval_s)
        return replies


def prompt_grid(grid: Grid, cfg: DictConfig) -> Grid:
    """``grid`` polled every ``federation.poll_interval_s`` (as Flower's grid does it when that is unset)."""
    interval = cfg.federation.get("poll_interval_s")
    return PromptGrid(grid, float(interval)) if interval else grid
