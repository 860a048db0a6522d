"""Release of the global model: a TorchScript audio -> emotion artifact, its labels and config, sent to devices.

``<run dir>/release/`` holds ``emotion_model.pt`` (waveform (1, samples) at
16 kHz -> probabilities (1, C)), ``labels.json`` and ``config.yaml`` (the
resolved config it was trained with). Its normaliser holds the public
reference statistics (:mod:`fl_ser.privacy.normalization`), never any
speaker's; with a speaker-level normalisation a device replaces them with its
own (unlabelled) statistics, on the device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from omegaconf import DictConfig, OmegaConf

from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.task import new_classifier, pipeline, set_arrays

log = logging.getLogger("fl_ser.server")


def release_model(cfg: DictConfig, arrays: list[np.ndarray], normalizer, out_dir: Path) -> dict:
    """Export and verify the artifact; returns its path, size and a self-check."""
    labels = list(cfg.labels)
    classifier = new_classifier(cfg, len(labels))
    set_arrays(classifier, arrays)
    pipe = pipeline(cfg, classifier, normalizer, labels).eval()
    path = pipe.export(out_dir / "emotion_model.pt")
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    # Self-check: the scripted artifact agrees with the eager pipeline on a test signal.
    probe = torch.randn(1, int(2.5 * SAMPLE_RATE), generator=torch.Generator().manual_seed(0)) * 0.05
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got, want = loaded(probe), pipe(probe)
    if got.shape != (1, len(labels)) or not torch.allclose(got, want, atol=1e-5):
        raise RuntimeError(f"released artifact {path} disagrees with the trained model")
    return {"path": str(path), "bytes": path.stat().st_size}


def deploy_and_collect(grid, cfg: DictConfig, arrays: list[np.ndarray], artifact: Path, rounds: int) -> list[dict]:
    """Send the release to every device: the artifact for its model store, and the weights it evaluates on its data."""
    from fl_ser.protocol import RELEASE_ARTIFACT, RELEASE_CONFIG_HASH, RELEASE_REPORT, RELEASE_ROUND
    from fl_ser.run_config import config_hash
    from server.server_app import reply_timeout

    nodes = list(grid.get_node_ids())
    report = bool(cfg.release.device_report)
    config = {RELEASE_REPORT: report, RELEASE_ARTIFACT: artifact.read_bytes(), RELEASE_ROUND: rounds,
              RELEASE_CONFIG_HASH: config_hash(cfg)}
    ins = EvaluateIns(ndarrays_to_parameters(arrays), config)
    msgs = [Message(content=compat.evaluateins_to_recorddict(ins, keep_input=True), dst_node_id=nid,
                    message_type=MessageType.EVALUATE, group_id=str(rounds + 1)) for nid in nodes]
    reports = []
    for reply in grid.send_and_receive(msgs, timeout=reply_timeout(cfg)):
        if reply.has_error():
            log.warning("device %s could not evaluate the release: %s", reply.metadata.src_node_id, reply.error)
            continue
        res = compat.recorddict_to_evaluateres(reply.content)
        if report and res.metrics:  # a device whose own policy forbids the report stores the model, says nothing
            reports.append({"node": int(reply.metadata.src_node_id), "loss": float(res.loss), **res.metrics})
    return reports
