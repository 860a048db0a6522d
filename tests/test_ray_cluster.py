"""A simulation attaches to a Ray cluster started separately (``ray start --head`` on loopback), as the README
shows, and leaves that cluster running: fl-ser only stops a cluster it started itself."""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from experiments.lab.processes import Processes, free_port
from tests.conftest import make_config


@pytest.mark.slow
def test_simulation_runs_on_a_separately_started_ray_cluster(tmp_path):
    import os

    import ray

    from experiments.train import run

    port = free_port()
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Processes(env)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    cluster.start("ray-head", [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                               "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                               "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
                  tmp_path / "ray-head.log")
    try:
        cluster.wait_for_log("ray-head", ("Ray runtime started",), timeout=120)
        address = f"127.0.0.1:{port}"
        cfg = make_config(tmp_path, "data.num_speakers=5", "partition.num_test_speakers=2", "rounds=2",
                          "data.utterances_per_emotion=3", f"federation.ray_address={address}")
        summary = run(cfg)
        assert summary["rounds"] == 2 and 0 <= summary["uar"] <= 1
        assert not cluster.dead(), "fl-ser stopped a Ray cluster it did not start"
        # the run was a driver (job) of that cluster, not of a private Ray instance
        ray.init(address=address, logging_level="ERROR", include_dashboard=False)
        try:
            jobs = ray._private.state.state.job_table()
        finally:
            ray.shutdown()
        assert len(jobs) >= 2  # fl-ser's run, and this check
    finally:
        cluster.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
