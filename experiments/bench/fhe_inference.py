"""Encrypted inference's costs and its agreement with the plaintext release, over loopback HTTP.

    python -m experiments.bench.fhe_inference --release RUN_DIR/release --data DIR --out DIR [--limit N]

Serves the release with the inference service on loopback (a real uvicorn server, in a thread) and classifies
every recording under ``--data`` (searched recursively; EmoDB: all 535) as a device would, with
:class:`clients.fhe_client.FHEClient`: features and normalisation on the device, encrypted, evaluated by the server,
decrypted. Reports the median seconds per utterance of the device's encryption, the server's evaluation and the
HTTP round trip (which includes it), and the device's decryption; the bytes up and down per utterance and of the key
registration; and agreement with the plaintext release (the top label, the largest probability and logit
differences). Writes ``fhe_inference.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from clients.fhe_client import FHEClient, softmax
from fl_ser.data.audio import AudioError, read_audio
from fl_ser.data.loaders import wav_files
from fl_ser.models.encrypted import device_features
from server.inference_service import InferenceService, create_app, load_release


class TimedService(InferenceService):
    """The service, recording how long each encrypted evaluation took (the request's server-side work)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluation_s: list[float] = []

    def predict(self, kid: str, ciphertext: bytes) -> bytes:
        start = time.perf_counter()
        scores = super().predict(kid, ciphertext)
        self.evaluation_s.append(time.perf_counter() - start)
        return scores


def _serve(service: InferenceService):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the inference service did not start on loopback")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def fhe_inference(release: str | Path, data: str | Path, limit: int | None = None) -> dict:
    """Encrypted versus plaintext inference of ``release`` on the recordings under ``data`` (the first ``limit``)."""
    files = wav_files(Path(data), recursive=True)[:limit]
    if not files:
        raise ValueError(f"{data} holds no .wav files")
    release = Path(release)
    model = torch.jit.load(str(release / "emotion_model.pt"), map_location="cpu").eval()
    service = TimedService(load_release(release))
    server, thread, url = _serve(service)
    rows, skipped = [], 0
    try:
        with tempfile.TemporaryDirectory() as keys, FHEClient(url, keys) as client:
            start = time.perf_counter()
            registration_bytes = client.register()
            registration_s = time.perf_counter() - start
            for path in files:
                try:
                    wave = read_audio(path)
                except AudioError:
                    skipped += 1
                    continue
                features = device_features(model, wave)
                with torch.no_grad():
                    probs = model(torch.from_numpy(wave)[None])[0].double().numpy()
                    logits = model.classifier(torch.from_numpy(features).float()[None])[0].double().numpy()
                got = client.predict(features)
                rows.append({"agree": int(softmax(got.logits).argmax() == probs.argmax()),
                             "prob_diff": float(np.abs(softmax(got.logits) - probs).max()),
                             "logit_diff": float(np.abs(got.logits - logits).max()),
                             "encrypt_s": got.encrypt_s, "round_trip_s": got.round_trip_s,
                             "decrypt_s": got.decrypt_s, "bytes_up": got.bytes_up, "bytes_down": got.bytes_down})
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "release": str(release), "model": type(service.release.classifier).__name__,
        "ckks": service.model.params.as_dict(), "depth": service.model.depth,
        "utterances": len(rows), "skipped": skipped,
        "top_label_agreement": sum(r["agree"] for r in rows) / len(rows),
        "max_probability_difference": max(r["prob_diff"] for r in rows),
        "max_logit_difference": max(r["logit_diff"] for r in rows),
        "median_encrypt_s": median("encrypt_s"), "median_server_evaluation_s": statistics.median(service.evaluation_s),
        "median_round_trip_s": median("round_trip_s"), "median_decrypt_s": median("decrypt_s"),
        "median_bytes_up": median("bytes_up"), "median_bytes_down": median("bytes_down"),
        "key_registration_bytes": registration_bytes, "key_registration_s": registration_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.fhe_inference",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--release", required=True, metavar="RUN_DIR/release")
    parser.add_argument("--data", required=True, metavar="DIR", help="recordings to classify (e.g. EmoDB's root)")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--limit", type=int, help="classify only the first N recordings")
    args = parser.parse_args()
    result = fhe_inference(args.release, args.data, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fhe_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
