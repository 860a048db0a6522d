"""SecAgg+ correctness: the securely aggregated mean equals plain aggregation of the same clipped updates.

Runs Flower's simulation engine twice over the project's real device mods (privacy boundary, SecAgg+,
fixed clipping) and server pieces (UserLevelDP with no noise, the SecAgg+ workflow as configured), with
devices whose "training" adds a fixed, known update, some larger than the clipping norm.
"""

import numpy as np
import pytest
from omegaconf import OmegaConf

NUM_DEVICES = 5
CLIP = 1.0
GLOBAL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.full(5, 0.5, dtype=np.float32)]


def device_update(pid: int) -> list[np.ndarray]:
    rng = np.random.default_rng(pid)
    scale = 3.0 if pid % 2 else 0.2  # odd devices exceed the clipping norm
    return [rng.normal(0, scale / 4, a.shape).astype(np.float32) for a in GLOBAL]


def clipped(update):
    norm = np.sqrt(sum(float((u**2).sum()) for u in update))
    return [u * min(1.0, CLIP / norm) for u in update]


def run_federation(secure: bool) -> list[np.ndarray]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.simulation import run_simulation

    from fl_ser.privacy.boundary import make_boundary_mod
    from server.server_app import secagg_workflow
    from server.user_dp import UserLevelDP

    class FixedUpdate(NumPyClient):
        def __init__(self, pid):
            self.pid = pid

        def fit(self, parameters, config):
            return [p + u for p, u in zip(parameters, device_update(self.pid), strict=True)], 1, {"declined": 0}

    mods = [make_boundary_mod(secure)] + ([secaggplus_mod] if secure else []) + [fixedclipping_mod]
    client = ClientApp(client_fn=lambda ctx: FixedUpdate(int(ctx.node_config["partition-id"])).to_client(), mods=mods)
    seen: list = []
    cfg = OmegaConf.create({"aggregation": {"num_shares": "auto", "reconstruction_threshold": 0.6,
                                            "clipping_range": 8.0, "max_weight": 1000.0, "timeout": None},
                            "privacy": {"update_clipping": {"enabled": True}}})
    server = ServerApp()

    @server.main()
    def main(grid, context):
        strategy = UserLevelDP(
            FedAvg(fraction_fit=1.0, min_fit_clients=NUM_DEVICES, min_available_clients=NUM_DEVICES,
                   fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(GLOBAL),
                   evaluate_fn=lambda r, arrays, c: seen.append(arrays) if r else None),
            clipping_norm=CLIP, noise_multiplier=0.0, placement="server")
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=secagg_workflow(cfg, NUM_DEVICES) if secure else None)(grid, legacy)

    run_simulation(server_app=server, client_app=client, num_supernodes=NUM_DEVICES,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2,
                                                                                     "include_dashboard": False}})
    return seen[-1]


@pytest.mark.slow
def test_secagg_plus_equals_plain_aggregation_of_clipped_updates():
    updates = [clipped(device_update(p)) for p in range(NUM_DEVICES)]
    expected = [g + np.mean([u[i] for u in updates], axis=0) for i, g in enumerate(GLOBAL)]
    plain = run_federation(secure=False)
    secure = run_federation(secure=True)
    for e, p, s in zip(expected, plain, secure, strict=True):
        np.testing.assert_allclose(p, e, atol=1e-6)
        # quantisation: 2 * clipping_range / 2^22 per value, summed over devices then averaged
        np.testing.assert_allclose(s, e, atol=2 * 8.0 / 2**22 * NUM_DEVICES)
        assert not np.array_equal(s, GLOBAL[0] if s.shape == GLOBAL[0].shape else GLOBAL[1])
