"""The resolved experiment config as it travels inside a Flower run config (Deployment Engine).

``flwr run`` sends one run config to the ServerApp and to every ClientApp. fl-ser
puts the whole resolved Hydra config in it, as JSON under one key, so the apps on
the SuperLink and on every SuperNode build exactly the experiment that was
resolved and checked on the submitting machine. This module stays light (no
torch): every Deployment-Engine message starts a fresh ClientApp process.
"""

from __future__ import annotations

import functools
import hashlib
import json

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_KEY = "experiment"


def encode(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def config_hash(cfg: DictConfig) -> str:
    """A short, stable fingerprint of the experiment (stored with every model a device receives); the same for
    a run and its resumption."""
    experiment = {k: v for k, v in json.loads(encode(cfg)).items() if k != "resume"}
    return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def decode(text: str) -> DictConfig:
    """The experiment :func:`encode` wrote, parsed once per process and read-only (callers share it)."""
    cfg = OmegaConf.create(json.loads(text))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def experiment_from_run_config(run_config) -> DictConfig:
    """The experiment a Flower run carries, or a clear error when the run was not submitted by fl-ser."""
    text = run_config.get(RUN_CONFIG_KEY) if run_config else None
    if not text:
        raise ValueError(f"this Flower run carries no fl-ser experiment (run config key {RUN_CONFIG_KEY!r} is empty). "
                         "Submit it with `python -m experiments.train federation=deployment ...` or "
                         "`python -m experiments.lab rehearse --lab DIR`, not with a bare `flwr run`.")
    return decode(str(text))
