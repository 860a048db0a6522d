"""Release of the global model: the audio -> emotion model in every format, its labels and config, sent to devices.

``<run dir>/release/`` holds the one eager pipeline (waveform (B, samples) at 16 kHz -> probabilities
(B, C)) as ``emotion_model.onnx`` (onnxruntime, no torch needed), ``emotion_model.pt2`` (``torch.export``)
and ``emotion_model.pt`` (TorchScript, for existing users), each checked against the eager model before
the folder is written (:mod:`fl_ser.models.export`), plus ``labels.json`` and ``config.yaml`` (the
resolved config it was trained with). Its normaliser holds the public reference statistics
(:mod:`fl_ser.privacy.normalization`), never any speaker's; with a speaker-level normalisation a device
replaces them with its own (unlabelled) statistics, on the device. The release message carries every
file (:data:`fl_ser.protocol.RELEASE_FILES`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from omegaconf import DictConfig, OmegaConf

from fl_ser.models.export import export_formats, staged
from fl_ser.protocol import RELEASE_CONFIG_FILE
from fl_ser.task import new_classifier, pipeline, set_arrays

log = logging.getLogger("fl_ser.server")
LABELS_FILE = "labels.json"


def release_model(cfg: DictConfig, arrays: list[np.ndarray], normalizer, out_dir: Path,
                  waves: Sequence[np.ndarray] = ()) -> dict:
    """Export, check and write the release into ``out_dir`` (new or empty; all or nothing).

    ``waves`` are real waveforms (16 kHz) every format is checked on besides the test signals. Returns
    the folder, each file's size, each format's largest difference from the eager model and the formats
    the model could not be exported to (with the reason).
    """
    labels = list(cfg.labels)
    classifier = new_classifier(cfg, len(labels))
    set_arrays(classifier, arrays)
    pipe = pipeline(cfg, classifier, normalizer, labels).eval()
    with staged(out_dir) as folder:
        exported = export_formats(pipe, folder, waves, formats=list(cfg.release.formats))
        (folder / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
        (folder / RELEASE_CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    return {"dir": str(out_dir), "bytes": {p.name: p.stat().st_size for p in sorted(Path(out_dir).iterdir())},
            "max_difference": exported.max_difference, "unavailable": exported.unavailable}


def deploy_and_collect(grid, cfg: DictConfig, arrays: list[np.ndarray], release: Path, rounds: int) -> list[dict]:
    """Send the release to every device: the release folder's files for its model store, and the weights it
    evaluates on its data."""
    from fl_ser.protocol import RELEASE_CONFIG_HASH, RELEASE_FILES, RELEASE_REPORT, RELEASE_ROUND
    from fl_ser.run_config import config_hash
    from server.server_app import reply_timeout

    nodes = list(grid.get_node_ids())
    report = bool(cfg.release.device_report)
    files = {key: (Path(release) / name).read_bytes() for name, key in RELEASE_FILES.items()
             if (Path(release) / name).exists()}
    config = {RELEASE_REPORT: report, RELEASE_ROUND: rounds, RELEASE_CONFIG_HASH: config_hash(cfg), **files}
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
