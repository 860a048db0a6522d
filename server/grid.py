"""The ServerApp's grid: Flower's, polled for replies every ``federation.poll_interval_s`` when that is set.

Flower 1.42's Deployment-Engine grid polls the SuperLink for replies every 3 s,
and a SecAgg+ round is four request/reply exchanges, so a round can never be
faster than several seconds of pure waiting; its in-memory (simulation) grid
polls every 0.1 s, which four exchanges a round also feel. The re-implemented
``send_and_receive`` is :class:`fl_ser.flower_compat.PromptGrid`.
"""

from __future__ import annotations

from flwr.serverapp import Grid
from omegaconf import DictConfig


def prompt_grid(grid: Grid, cfg: DictConfig) -> Grid:
    """``grid`` polled every ``federation.poll_interval_s`` (as Flower's grid does it when that is unset)."""
    from fl_ser.flower_compat import PromptGrid

    interval = cfg.federation.get("poll_interval_s")
    return PromptGrid(grid, float(interval)) if interval else grid
