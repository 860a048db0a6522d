"""Encrypted emotion inference over HTTP: ``python -m server.inference_service --release RUN_DIR/release``.

A thin device (headset, car) computes the release's features and normalisation
itself, encrypts them under its own CKKS key and sends the ciphertext here; the
service evaluates the release's classifier on it (:mod:`fl_ser.models.encrypted`)
and answers with the encrypted logits, which only the device can decrypt. The
service holds the classifier's weights (in the clear) and each device's public
evaluation keys, never a secret key, never a feature or a score in the clear.

The API (names in :mod:`fl_ser.protocol`): ``GET /v1/model`` (labels, input size,
the CKKS parameters a device must use, the release's sha256, the size caps),
``POST /v1/keys`` (body: the device's public context with its relinearisation
and Galois keys; reply ``{"key_id": ...}``) and ``POST /v1/predict`` (body: one
ciphertext, the key id in the ``X-FL-SER-Key-Id`` header; reply: the encrypted
logits). Every refusal is a 4xx reply ``{"error": ...}`` naming the problem and
the fix; bodies over the caps (``--max-keys-bytes``, ``--max-predict-bytes``)
are refused from their Content-Length or, without one, once the body grows past
the cap. At most ``--max-keys`` devices' keys are kept (28 MB each for a
PolyMLP on 74 features with the Galois keys its rotations need, 53 MB with
TenSEAL's full set; more in memory); registering one more forgets the oldest, whose device
is then told to register again. The log records key ids, sizes and timings,
never a ciphertext or a key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from fl_ser import protocol
from fl_ser.models.encrypted import EncryptedClassifier
from fl_ser.privacy.ckks import CKKSError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("fl_ser.inference")

DEFAULT_MAX_KEYS = 8
DEFAULT_MAX_KEYS_BYTES = 96 * 2**20      # a depth-3 key set (N=8192, 4 data moduli): 28 MB, 53 MB with all rotations
DEFAULT_MAX_PREDICT_BYTES = 2 * 2**20    # one fresh ciphertext at N=8192 is ~430 kB


class ReleaseError(ValueError):
    """The release folder cannot be served; the message names the file and the fix."""


class ServiceError(Exception):
    """A refused request: its HTTP status and the text of its JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Release:
    """What the service needs of a release: the trained classifier, its labels and the artifact's sha256."""

    classifier: nn.Module  # eager, with the artifact's weights
    labels: list[str]
    sha256: str


def load_release(release_dir: str | Path) -> Release:
    """The classifier of a release folder (``emotion_model.pt``, ``labels.json``, ``config.yaml``; server.release):
    rebuilt from its config and given the artifact's own classifier weights."""
    from omegaconf import OmegaConf

    from fl_ser.models.runtimes import load_torchscript
    from fl_ser.task import new_classifier

    root = Path(release_dir).expanduser()
    files = {name: root / name for name in ("emotion_model.pt", "labels.json", "config.yaml")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise ReleaseError(f"{root} is not a release folder: it lacks {', '.join(missing)}. Give RUN_DIR/release of "
                           "a finished run (python -m experiments.train writes it)")
    data = files["emotion_model.pt"].read_bytes()
    labels = json.loads(files["labels.json"].read_text())
    cfg = OmegaConf.load(files["config.yaml"])
    artifact = load_torchscript(data)  # the bytes whose sha256 is served
    classifier = new_classifier(cfg, len(labels))
    try:
        classifier.load_state_dict(artifact.classifier.state_dict())
    except RuntimeError as err:
        raise ReleaseError(f"{root}: the artifact's classifier does not match its config.yaml ({err}); the release "
                           "is damaged") from None
    return Release(classifier.eval(), list(labels), hashlib.sha256(data).hexdigest())


class KeyRing:
    """The devices' public contexts by key id, at most ``capacity``: adding one more forgets the oldest."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the service must keep at least one key, got --max-keys {capacity}")
        self.capacity = capacity
        self._contexts: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, kid: str, ctx) -> list[str]:
        """Keep ``ctx`` as the newest key; returns the ids it evicted."""
        with self._lock:
            self._contexts.pop(kid, None)
            self._contexts[kid] = ctx
            evicted = []
            while len(self._contexts) > self.capacity:
                evicted.append(self._contexts.popitem(last=False)[0])
            return evicted

    def get(self, kid: str):
        with self._lock:
            return self._contexts.get(kid)

    def __len__(self) -> int:
        with self._lock:
            return len(self._contexts)


class InferenceService:
    """The service's state and operations, free of HTTP: one release's classifier and the devices' keys."""

    def __init__(self, release: Release, *, max_keys: int = DEFAULT_MAX_KEYS,
                 max_keys_bytes: int = DEFAULT_MAX_KEYS_BYTES, max_predict_bytes: int = DEFAULT_MAX_PREDICT_BYTES):
        self.release = release
        self.model = EncryptedClassifier(release.classifier)
        self.keys = KeyRing(max_keys)
        self.max_keys_bytes, self.max_predict_bytes = int(max_keys_bytes), int(max_predict_bytes)

    def info(self) -> dict:
        return {protocol.FHE_LABELS: self.release.labels, protocol.FHE_INPUT_SIZE: self.model.input_size,
                protocol.FHE_CKKS: self.model.params.as_dict(), protocol.FHE_MODEL_SHA256: self.release.sha256,
                protocol.FHE_SCORES: "logits", protocol.FHE_ROTATION_STEPS: self.model.rotation_steps,
                protocol.FHE_MAX_KEYS_BYTES: self.max_keys_bytes,
                protocol.FHE_MAX_PREDICT_BYTES: self.max_predict_bytes}

    def register(self, data: bytes) -> str:
        try:
            kid, ctx = self.model.load_keys(data)
        except CKKSError as err:
            raise ServiceError(400, str(err)) from None
        evicted = self.keys.add(kid, ctx)
        log.info("key %s registered (%d bytes); %d keys held%s", kid, len(data), len(self.keys),
                 f", evicted {', '.join(evicted)}" if evicted else "")
        return kid

    def predict(self, kid: str, ciphertext: bytes) -> bytes:
        ctx = self.keys.get(kid)
        if ctx is None:
            raise ServiceError(404, f"no key {kid!r} is registered (or it was evicted): POST the public context with "
                                    f"its evaluation keys to {protocol.FHE_KEYS_PATH} and send the key id it returns")
        start = time.perf_counter()
        try:
            scores = self.model.evaluate(ctx, ciphertext)
        except CKKSError as err:
            raise ServiceError(400, str(err)) from None
        log.info("prediction for key %s: %d bytes in, %d bytes out, %.0f ms", kid, len(ciphertext), len(scores),
                 1000 * (time.perf_counter() - start))
        return scores


async def read_capped(request, cap: int, what: str) -> bytes:
    """The request's body, refused (413) when its Content-Length or its actual size exceeds ``cap`` bytes."""
    too_big = f"{what} larger than this service's cap of {cap} bytes (GET {protocol.FHE_MODEL_PATH} gives the caps)"
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise ServiceError(413, f"{too_big}: Content-Length {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ServiceError(413, too_big)
        chunks.append(chunk)
    if not size:
        raise ServiceError(400, f"{what} is empty: send the raw bytes as the body ({protocol.FHE_CONTENT_TYPE})")
    return b"".join(chunks)


def create_app(service: InferenceService):
    """The FastAPI application serving ``service``."""
    app = FastAPI(title="fl-ser encrypted inference", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({protocol.FHE_ERROR: message}, status_code=status)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, err: ServiceError):
        log.warning("refused %s %s (%d): %s", request.method, request.url.path, err.status, err)
        return error(err.status, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # unknown paths and methods
        return error(err.status_code, f"{request.method} {request.url.path}: {err.detail}; the API is GET "
                                      f"{protocol.FHE_MODEL_PATH}, POST {protocol.FHE_KEYS_PATH}, POST "
                                      f"{protocol.FHE_PREDICT_PATH}")

    @app.get(protocol.FHE_MODEL_PATH)
    async def model_info():
        return service.info()

    @app.post(protocol.FHE_KEYS_PATH)
    async def register(request: Request):
        data = await read_capped(request, service.max_keys_bytes, "the key upload")
        return {protocol.FHE_KEY_ID: await run_in_threadpool(service.register, data)}

    @app.post(protocol.FHE_PREDICT_PATH)
    async def predict(request: Request):
        kid = request.headers.get(protocol.FHE_KEY_ID_HEADER)
        if not kid:
            raise ServiceError(400, f"no {protocol.FHE_KEY_ID_HEADER} header: send the key id that POST "
                                    f"{protocol.FHE_KEYS_PATH} returned")
        data = await read_capped(request, service.max_predict_bytes, "the ciphertext")
        scores = await run_in_threadpool(service.predict, kid, data)
        return Response(scores, media_type=protocol.FHE_CONTENT_TYPE)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.inference_service", description=__doc__.split("\n")[0])
    parser.add_argument("--release", required=True, metavar="RUN_DIR/release", help="the release folder to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-keys", type=int, default=DEFAULT_MAX_KEYS, help="devices' key sets kept (oldest "
                        f"forgotten first; default {DEFAULT_MAX_KEYS})")
    parser.add_argument("--max-keys-bytes", type=int, default=DEFAULT_MAX_KEYS_BYTES,
                        help=f"largest key upload (default {DEFAULT_MAX_KEYS_BYTES})")
    parser.add_argument("--max-predict-bytes", type=int, default=DEFAULT_MAX_PREDICT_BYTES,
                        help=f"largest prediction request (default {DEFAULT_MAX_PREDICT_BYTES})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        release = load_release(args.release)
        service = InferenceService(release, max_keys=args.max_keys, max_keys_bytes=args.max_keys_bytes,
                                   max_predict_bytes=args.max_predict_bytes)
    except (ReleaseError, CKKSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    import uvicorn

    log.info("serving %s (sha256 %s, %s, CKKS %s) on http://%s:%d", args.release, release.sha256[:16],
             type(release.classifier).__name__, service.model.params.as_dict(), args.host, args.port)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
