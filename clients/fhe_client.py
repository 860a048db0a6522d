"""The device's side of encrypted inference: its own CKKS key, encrypted features out, encrypted scores back.

The device computes the release's features and normalisation itself
(:func:`fl_ser.models.encrypted.device_features`), encrypts them under a CKKS
key that never leaves it, and asks an inference server
(``python -m server.inference_service``) to evaluate the classifier on the
ciphertext; it decrypts the logits and applies the softmax itself. The server
sees ciphertexts, their sizes and their timing, nothing else. torch is imported
only once features are computed or ciphertexts made, so the device's tools start fast.

The secret key is kept in ``KEY_DIR/ckks-<parameters>.key`` (mode 0600,
written once: :func:`fl_ser.privacy.ckks.write_secret_context`), one per set of
CKKS parameters, so a device registers its public evaluation keys (28 MB for a
PolyMLP on 74 features: Galois keys only for the rotations the model needs,
:func:`fl_ser.models.encrypted.restrict_galois_keys`) once per server: a prediction under a key the server does not hold
(never registered, or evicted) registers it and retries once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_ser import protocol
from fl_ser.privacy.ckks import (
    CKKSError,
    CKKSParams,
    key_id,
    open_secret_context,
    public_bytes,
)


class FHEError(RuntimeError):
    """Encrypted inference cannot go on: the server is unreachable or refused, or the device's key is unusable."""


@dataclass(frozen=True)
class Exchange:
    """One encrypted prediction: its logits, the device's and the round trip's seconds, and the bytes each way."""

    logits: np.ndarray
    encrypt_s: float
    round_trip_s: float  # the request: upload, the server's evaluation, download
    decrypt_s: float
    bytes_up: int
    bytes_down: int


def key_path(key_dir: str | Path, params: CKKSParams) -> Path:
    bits = "-".join(str(b) for b in params.coeff_mod_bit_sizes)
    return Path(key_dir).expanduser() / f"ckks-{params.poly_modulus_degree}-{bits}-s{params.scale_bits}.key"


def device_key(key_dir: str | Path, params: CKKSParams):
    """The device's secret CKKS context for ``params``: read from ``key_dir``, or made and stored there (0600)."""
    try:
        return open_secret_context(key_path(key_dir, params), params)  # checks its mode, secret key, parameters
    except CKKSError as err:
        raise FHEError(f"{err}. Fix the file's mode, or delete it and a new key is made (the server then gets the "
                       "new public keys)") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


class FHEClient:
    """Encrypted predictions from the inference server at ``url``, under the device's key kept in ``key_dir``."""

    def __init__(self, url: str, key_dir: str | Path, *, timeout: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self.info = self._request("GET", protocol.FHE_MODEL_PATH).json()
        try:
            self.labels = list(self.info[protocol.FHE_LABELS])
            self.input_size = int(self.info[protocol.FHE_INPUT_SIZE])
            self.params = CKKSParams.from_config(self.info[protocol.FHE_CKKS])
            self.rotation_steps = [int(step) for step in self.info[protocol.FHE_ROTATION_STEPS]]
        except (KeyError, TypeError, ValueError) as err:
            raise FHEError(f"{self.url}{protocol.FHE_MODEL_PATH} is not an fl-ser inference service's model info "
                           f"({type(err).__name__}: {err})") from None
        self.ctx = device_key(key_dir, self.params)
        self.key_id = key_id(self.ctx)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FHEClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry_unknown_key: bool = False, **kwargs):
        """The server's successful reply; :class:`FHEError` with its reason otherwise. ``retry_unknown_key``: a 404
        (the server does not hold this device's key, yet or any more) registers the key and sends once more."""
        import httpx

        try:
            reply = self._http.request(method, path, **kwargs)
            if reply.status_code == 404 and retry_unknown_key:
                self.register()
                reply = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise FHEError(f"cannot reach the inference server {self.url} ({type(err).__name__}: {err}); is "
                           "`python -m server.inference_service` running there?") from None
        if reply.is_success:
            return reply
        try:
            reason = reply.json()[protocol.FHE_ERROR]
        except (ValueError, KeyError, TypeError):
            reason = reply.text[:200]
        raise FHEError(f"the inference server {self.url} refused {method} {path} ({reply.status_code}): {reason}")

    def check_release(self, labels: list[str], sha256: str) -> None:
        """Refuse a server that serves another release than the device's model (its front end must match)."""
        served = self.info.get(protocol.FHE_MODEL_SHA256)
        if served != sha256 or self.labels != list(labels):
            raise FHEError(f"the inference server {self.url} serves release {str(served)[:16]} with labels "
                           f"{self.labels}, the device's model is {sha256[:16]} with labels {list(labels)}: the "
                           "features must come from the release the server evaluates; store that release on the "
                           "device (or pick it with --version), or start the server on the device's release")

    def register(self) -> int:
        """Send the public context with relinearisation and Galois keys (never the secret key); the bytes sent."""
        from fl_ser.models.encrypted import restrict_galois_keys

        if not self.ctx.has_relin_keys():
            self.ctx.generate_relin_keys()
        if not self.ctx.has_galois_keys():
            restrict_galois_keys(self.ctx, self.rotation_steps)
        data = public_bytes(self.ctx, evaluation_keys=True)
        reply = self._request("POST", protocol.FHE_KEYS_PATH, content=data,
                              headers={"content-type": protocol.FHE_CONTENT_TYPE})
        if reply.json().get(protocol.FHE_KEY_ID) != self.key_id:
            raise FHEError(f"the inference server {self.url} registered the key under another id than its public "
                           f"key's ({self.key_id}): it is not an fl-ser inference service of this version")
        return len(data)

    def predict(self, features: np.ndarray) -> Exchange:
        """The logits of one normalised feature vector, evaluated encrypted by the server (its round trip includes a
        key registration when the server lacks the key)."""
        from fl_ser.models.encrypted import decrypt_scores, encrypt_features

        if np.shape(features) != (self.input_size,):
            raise FHEError(f"{np.shape(features)} features, the server's model takes ({self.input_size},)")
        start = time.perf_counter()
        ciphertext = encrypt_features(self.ctx, features, self.params)
        sent = time.perf_counter()
        reply = self._request("POST", protocol.FHE_PREDICT_PATH, retry_unknown_key=True, content=ciphertext,
                              headers={protocol.FHE_KEY_ID_HEADER: self.key_id,
                                       "content-type": protocol.FHE_CONTENT_TYPE})
        received = time.perf_counter()
        try:
            logits = decrypt_scores(self.ctx, reply.content, len(self.labels))
        except CKKSError as err:
            raise FHEError(str(err)) from None
        return Exchange(logits, sent - start, received - sent, time.perf_counter() - received, len(ciphertext),
                        len(reply.content))

    def classifier(self, pipeline) -> Callable[[np.ndarray], np.ndarray]:
        """Waveform -> probabilities: ``pipeline``'s front end on the device, its classifier on the server."""
        from fl_ser.models.encrypted import device_features

        return lambda wave: softmax(self.predict(device_features(pipeline, wave)).logits)
