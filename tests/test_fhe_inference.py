"""Encrypted inference: the polynomial MLP, the classifier on CKKS ciphertexts, the HTTP service and the device client.

The encrypted scores must match the plaintext model's; only FHE-friendly models are served; the service refuses
malformed, secret-bearing or oversized uploads with a 4xx JSON error, keeps a bounded number of keys and logs no
ciphertext; and over loopback HTTP a device classifies real EmoDB recordings encrypted exactly as it does locally.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
import torch
from conftest import EMODB, make_config, needs_emodb
from opacus.validators import ModuleValidator

from fl_ser import protocol
from fl_ser.models import CNN, MLP, PolyMLP
from fl_ser.models.encrypted import (
    EncryptedClassifier,
    NotFHEFriendly,
    decrypt_scores,
    encrypt_features,
    naf,
    params_for_depth,
    restrict_galois_keys,
)
from fl_ser.privacy.ckks import CKKSError, CKKSParams, key_id, new_context, public_bytes
from server.inference_service import InferenceService, Release, ReleaseError, create_app, load_release

#: starlette's TestClient warns that it will move from httpx to httpx2; the service's own client uses httpx.
pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")

LABELS = ["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"]


def poly_mlp(seed: int = 0) -> PolyMLP:
    torch.manual_seed(seed)
    model = PolyMLP([74], len(LABELS), hidden=[32])
    with torch.no_grad():  # trained-looking weights: larger than the initialisation, nonzero biases
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def linear(seed: int = 1) -> MLP:
    torch.manual_seed(seed)
    return MLP([74], len(LABELS), hidden=[], dropout=0.0).eval()


@pytest.fixture(scope="module")
def contexts():
    """A device's secret context per depth, 3 (PolyMLP) and 1 (linear), with Galois keys for its model's rotations
    only (as a device makes them)."""
    out = {}
    for make in (poly_mlp, linear):
        enc = EncryptedClassifier(make())
        out[enc.depth] = new_context(enc.params)
        restrict_galois_keys(out[enc.depth], enc.rotation_steps)
    return out


def plaintext(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


# -- the model ------------------------------------------------------------------------------------
def test_poly_mlp_trains_with_opacus_dp_sgd_and_is_configured(tmp_path):
    from fl_ser.task import new_classifier
    from fl_ser.training import DPSGDConfig, LocalTrainConfig, train_local

    model = PolyMLP([74], 7)
    assert ModuleValidator.validate(model, strict=True) == []
    trainable = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert trainable == {torch.nn.Linear}  # Opacus computes per-sample gradients of Linear layers only
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 74, generator=generator).clamp(-2, 2), torch.randint(0, 7, (64,), generator=generator)
    out = train_local(model, x, y, LocalTrainConfig(epochs=1, batch_size=16, lr=0.1),
                      dp=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=1e9))
    assert out["spent"] and all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    cfg = make_config(tmp_path, "model=mlp_poly")
    built = new_classifier(cfg, len(cfg.labels))
    assert isinstance(built, PolyMLP) and EncryptedClassifier(built).depth == 3
    x = torch.linspace(-4, 4, 81)
    fit = model.net[1](x)  # the quadratic least-squares fit of ReLU on [-4, 4]
    assert float((fit - torch.relu(x)).abs().max()) < 0.4


# -- the classifier on ciphertexts ------------------------------------------------------------------
@pytest.mark.parametrize("make, depth", [(poly_mlp, 3), (linear, 1)])
def test_encrypted_scores_match_the_plaintext_model(contexts, make, depth):
    model = make()
    enc = EncryptedClassifier(model)
    assert enc.depth == depth and enc.params == params_for_depth(depth)
    ctx = contexts[depth]
    rng = np.random.default_rng(0)
    for x in np.clip(rng.normal(size=(3, 74)) * 1.5, -2, 2):
        scores = decrypt_scores(ctx, enc.evaluate(ctx, encrypt_features(ctx, x, enc.params)), len(LABELS))
        want = plaintext(model, x[None])[0]
        assert np.abs(scores - want).max() < 1e-3 * max(1.0, np.abs(want).max())
        assert scores.argmax() == want.argmax()


def test_galois_keys_cover_only_the_rotations_the_model_needs(contexts):
    for step in range(1, 4096):
        digits = naf(step)
        assert sum(digits) == step and all(abs(d) & (abs(d) - 1) == 0 for d in digits)
    steps = EncryptedClassifier(poly_mlp()).rotation_steps
    assert steps == [-16, -8, -4, -2, -1, 1, 2, 4, 8, 16, 32, 64]
    assert contexts[3].data.galois_keys().size() == len(steps)  # TenSEAL's full set has 24


@pytest.mark.parametrize("model", [MLP([74], 7, hidden=[16]), CNN([1, 64, 300], 7)])
def test_models_ckks_cannot_evaluate_are_refused_naming_the_fix(model):
    with pytest.raises(NotFHEFriendly, match="model=mlp_poly"):
        EncryptedClassifier(model)


def test_depth_must_fit_the_ckks_parameters():
    with pytest.raises(CKKSError, match=r"depth 3 but .* give 1 levels"):
        EncryptedClassifier(poly_mlp(), CKKSParams(8192, (60, 40, 60), 40))
    with pytest.raises(CKKSError, match="one hidden layer"):
        EncryptedClassifier(PolyMLP([74], 7, hidden=[16, 16]))


# -- the service ------------------------------------------------------------------------------------
def make_service(model=None, **caps) -> InferenceService:
    return InferenceService(Release(model if model is not None else linear(), LABELS, "0" * 64), **caps)


def http(service):
    from fastapi.testclient import TestClient

    return TestClient(create_app(service))


def register(client, ctx) -> str:
    reply = client.post(protocol.FHE_KEYS_PATH, content=public_bytes(ctx, evaluation_keys=True))
    assert reply.status_code == 200, reply.text
    return reply.json()[protocol.FHE_KEY_ID]


def predict(client, kid: str, ciphertext: bytes):
    return client.post(protocol.FHE_PREDICT_PATH, content=ciphertext, headers={protocol.FHE_KEY_ID_HEADER: kid})


def refused(reply, status: int, match: str) -> None:
    assert reply.status_code == status, reply.text
    assert match in reply.json()[protocol.FHE_ERROR]


def test_service_serves_encrypted_predictions(contexts, caplog):
    model, ctx = linear(), contexts[1]
    service = make_service(model)
    client = http(service)
    info = client.get(protocol.FHE_MODEL_PATH).json()
    assert info[protocol.FHE_LABELS] == LABELS and info[protocol.FHE_INPUT_SIZE] == 74
    assert info[protocol.FHE_CKKS] == params_for_depth(1).as_dict()
    assert info[protocol.FHE_ROTATION_STEPS] == service.model.rotation_steps
    with caplog.at_level(logging.INFO, logger="fl_ser.inference"):
        kid = register(client, ctx)
        assert kid == key_id(ctx)
        x = np.linspace(-2, 2, 74)
        ciphertext = encrypt_features(ctx, x, service.model.params)
        reply = predict(client, kid, ciphertext)
    assert reply.status_code == 200 and reply.headers["content-type"] == protocol.FHE_CONTENT_TYPE
    scores = decrypt_scores(ctx, reply.content, len(LABELS))
    np.testing.assert_allclose(scores, plaintext(model, x[None])[0], atol=1e-4)
    logged = caplog.text
    assert kid in logged and "bytes in" in logged
    for blob in (ciphertext, reply.content):  # no ciphertext bytes, in any encoding, reach the log
        for start in (0, len(blob) // 2, len(blob) - 64):
            piece = blob[start:start + 24]
            assert piece.hex() not in logged and base64.b64encode(piece).decode()[:24] not in logged
            assert repr(piece)[2:-1] not in logged
    assert max(len(r.getMessage()) for r in caplog.records) < 300


def test_service_refuses_bad_key_uploads(contexts):
    client = http(make_service())
    refused(client.post(protocol.FHE_KEYS_PATH, content=b"not a context at all"), 400, "not a TenSEAL context")
    secret = contexts[1].serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                   save_relin_keys=False)
    refused(client.post(protocol.FHE_KEYS_PATH, content=secret), 400, "holds a secret key")
    refused(client.post(protocol.FHE_KEYS_PATH, content=public_bytes(contexts[1])), 400, "lacks its public")
    other = public_bytes(new_context(params_for_depth(3)))
    refused(client.post(protocol.FHE_KEYS_PATH, content=other), 400, "other CKKS parameters")
    refused(client.post(protocol.FHE_KEYS_PATH, content=b""), 400, "is empty")


def test_service_refuses_bad_ciphertexts(contexts):
    service = make_service()
    client = http(service)
    kid = register(client, contexts[1])
    params = service.model.params
    refused(predict(client, kid, b"\x00garbage" * 50), 400, "does not load")
    refused(predict(client, kid, encrypt_features(contexts[1], np.zeros(10), params)), 400, "holds 10 values")
    deeper = contexts[3]
    refused(predict(client, kid, encrypt_features(deeper, np.zeros(74), params_for_depth(3))), 400, "does not load")
    refused(predict(client, "0123456789abcdef", encrypt_features(contexts[1], np.zeros(74), params)), 404,
            "no key '0123456789abcdef'")
    refused(client.post(protocol.FHE_PREDICT_PATH, content=b"x"), 400, protocol.FHE_KEY_ID_HEADER)
    refused(client.get("/v1/nothing"), 404, "the API is")


def test_service_caps_request_sizes():
    client = http(make_service(max_keys_bytes=1000, max_predict_bytes=500))
    info = client.get(protocol.FHE_MODEL_PATH).json()
    assert (info[protocol.FHE_MAX_KEYS_BYTES], info[protocol.FHE_MAX_PREDICT_BYTES]) == (1000, 500)
    refused(client.post(protocol.FHE_KEYS_PATH, content=b"k" * 1001), 413, "Content-Length 1001")
    refused(client.post(protocol.FHE_PREDICT_PATH, content=b"c" * 501, headers={protocol.FHE_KEY_ID_HEADER: "k"}),
            413, "cap of 500 bytes")

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(20):
            yield b"k" * 100

    refused(client.post(protocol.FHE_KEYS_PATH, content=chunks()), 413, "cap of 1000 bytes")
    refused(client.post(protocol.FHE_KEYS_PATH, content=b"k", headers={"content-length": "-5"}), 413,
            "Content-Length")


def test_service_keeps_a_bounded_number_of_keys():
    service = make_service(max_keys=1)
    client = http(service)
    first, second = (new_context(params_for_depth(1), galois=True) for _ in range(2))
    kid_first, kid_second = register(client, first), register(client, second)
    assert len(service.keys) == 1
    x = encrypt_features(first, np.zeros(74), service.model.params)
    refused(predict(client, kid_first, x), 404, "evicted")
    assert predict(client, kid_second, encrypt_features(second, np.zeros(74), service.model.params)).status_code == 200


def test_service_refuses_a_model_it_cannot_evaluate_and_a_missing_release(tmp_path):
    with pytest.raises(NotFHEFriendly, match="model=mlp_poly"):
        make_service(MLP([74], 7, hidden=[16]))
    with pytest.raises(ReleaseError, match=r"lacks emotion_model\.pt, labels\.json, config\.yaml"):
        load_release(tmp_path)


def test_the_device_key_is_made_once_and_kept_private(tmp_path):
    from clients.fhe_client import FHEError, device_key, key_path

    params = params_for_depth(1)
    first = device_key(tmp_path, params)
    path = key_path(tmp_path, params)
    assert path.stat().st_mode & 0o777 == 0o600 and first.has_secret_key()
    assert key_id(device_key(tmp_path, params)) == key_id(first)  # read back, not replaced
    path.chmod(0o644)
    with pytest.raises(FHEError, match="chmod 600"):
        device_key(tmp_path, params)


# -- a device and the server over loopback, on EmoDB -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def emodb_release(tmp_path):
    """A PolyMLP fitted (centralised, briefly) on one EmoDB speaker, released as a run would, in a device store."""
    from clients.model_store import FILES, ModelStore
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.features.normalize import FeatureNormalizer
    from fl_ser.task import extract, extractor_from_config, get_arrays, new_classifier
    from server.release import release_model

    cfg = make_config(tmp_path, "data=emodb", f"data.root={EMODB}", "model=mlp_poly")
    corpus = corpus_from_config(cfg)
    speakers = corpus.speakers
    utts, waves, _ = corpus.load_speaker(speakers[0])
    x = extract(extractor_from_config(cfg), waves)
    y = torch.tensor([corpus.label_of(u) for u in utts])
    normalizer = FeatureNormalizer((74,), "vector", bound=2.0).fit(x)
    clf = new_classifier(cfg, len(cfg.labels))
    opt = torch.optim.Adam(clf.parameters(), lr=0.01)
    z = normalizer(x)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(z), y).backward()
        opt.step()
    release = tmp_path / "release"
    release_model(cfg, get_arrays(clf), normalizer, release)
    store = ModelStore(tmp_path / "store")
    store.add({p.name: p.read_bytes() for p in release.iterdir() if p.name in FILES}, list(cfg.labels),
              {"round": 0, "config_hash": "test"})
    held_out = tmp_path / "held_out"  # 12 recordings of a speaker the model never saw
    held_out.mkdir()
    for u in corpus.utterances_of(speakers[-1])[:12]:
        (held_out / f"{u.uid}.wav").symlink_to(u.source)
    return release, store, held_out


@needs_emodb
@pytest.mark.slow
def test_a_device_classifies_emodb_encrypted_as_it_does_locally(emodb_release, capsys, caplog):
    import uvicorn

    from clients import predict as predict_cli

    release, store, held_out = emodb_release
    service = InferenceService(load_release(release))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        url = f"http://127.0.0.1:{server.config.port}"
        assert predict_cli.main(["--store", str(store.root), str(held_out), "--json"]) == 0
        local = {p["file"]: p for p in json.loads(capsys.readouterr().out)}
        with caplog.at_level(logging.INFO, logger="fl_ser.inference"):
            assert predict_cli.main(["--store", str(store.root), "--fhe", url, str(held_out), "--json"]) == 0
            encrypted = {p["file"]: p for p in json.loads(capsys.readouterr().out)}
            assert encrypted.keys() == local.keys() and len(local) == 12
            for name, p in encrypted.items():
                assert p["top"] == local[name]["top"]
                diff = max(abs(p["probabilities"][k] - v) for k, v in local[name]["probabilities"].items())
                assert diff < 1e-4, name
            one = sorted(held_out.iterdir())[0]  # a second run reuses the device's key: no second registration
            assert predict_cli.main(["--store", str(store.root), "--fhe", url, str(one)]) == 0
            assert "classified encrypted by" in capsys.readouterr().out
        logged = [r.msg.split(" %s")[0] for r in caplog.records]
        assert logged.count("key") == 1 and logged.count("prediction for key") == 13  # one registration
        keys = list((store.root / predict_cli.FHE_KEY_DIR).iterdir())
        assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600
    finally:
        server.should_exit = True
        thread.join(timeout=10)
