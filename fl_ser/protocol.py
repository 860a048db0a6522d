"""Names both sides of a federation share: message keys, the SecAgg+ mask scheme, and the public error codes.

A leaf module (standard library only): the ClientApp, the ServerApp and the
benchmarks import it, and it imports nothing of theirs. A device and a server
that disagree on anything here cannot work together, so everything they must
agree on is written down once, here.
"""

from __future__ import annotations

from enum import IntEnum

#: Fit-config keys the server sends each round.
KEY_SERVER_ROUND = "server_round"
KEY_CLIPPING_NORM = "clipping_norm"  # Flower's own key (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM)
KEY_DEVICE_NOISE_STD = "fl-ser.device_noise_std"  # the std of this device's share of user-level noise
KEY_PROXIMAL_MU = "proximal_mu"  # FedProx (flwr.server.strategy.FedProx sends it)

#: Fit-metric keys of a device's sample-level epsilons: lifetime total, this run's share, the parts, and the lifetime
#: total against anyone who sees this device's own update (differs from the total only under distributed DP).
EPSILON_METRICS = ("epsilon", "epsilon_run", "epsilon_normalization", "epsilon_training", "epsilon_local")

#: The model files by format (fl_ser/models/export.py writes them, fl_ser/models/runtimes.py runs them): a release
#: holds the first three (export.FORMATS), one model three times; releases made before ONNX export hold only the
#: TorchScript file. The ExecuTorch file for phones is made on request from a release (clients.export_mobile).
MODEL_FILES = {"onnx": "emotion_model.onnx", "pt2": "emotion_model.pt2", "torchscript": "emotion_model.pt",
               "pte": "emotion_model.pte"}
RELEASE_CONFIG_FILE = "config.yaml"  # the resolved config the release was trained with (public)
#: The only classes a device builds from a release's config (clients/personalise.py): the config comes from the
#: server, and Hydra's instantiate would call any ``_target_`` it names. Every conf/features and conf/model
#: target must be here (tests/test_device_tools.py checks it).
RELEASE_TARGETS = frozenset({"fl_ser.features.Functionals", "fl_ser.features.LogMel", "fl_ser.features.MFCCDeltas",
                             "fl_ser.models.MLP", "fl_ser.models.PolyMLP", "fl_ser.models.CNN"})

#: Evaluate-config keys of the release message (server/release.py sends them after the last round).
RELEASE_ARTIFACT = "fl-ser.release.artifact"  # the TorchScript file: its presence marks the release message
#: Each release file and the key its bytes travel under (a format the release lacks is left out).
RELEASE_FILES = {MODEL_FILES["torchscript"]: RELEASE_ARTIFACT, MODEL_FILES["onnx"]: "fl-ser.release.onnx",
                 MODEL_FILES["pt2"]: "fl-ser.release.pt2", RELEASE_CONFIG_FILE: "fl-ser.release.config"}
RELEASE_ROUND = "fl-ser.release.round"
RELEASE_CONFIG_HASH = "fl-ser.release.config_hash"
RELEASE_REPORT = "fl-ser.release.report"  # False: store the release, send no metrics back

#: SecAgg+ setup-stage key: the mask expansion both sides use. The server announces it in the setup
#: message and every device echoes it in its setup reply; a mismatch on either side stops at setup.
MASK_SCHEME_KEY = "fl-ser.mask_scheme"
MASK_SCHEME = "hkdf-sha256+chacha20/v1"

#: aggregation=ckks (server/ckks_aggregation.py, clients/ckks_mod.py): the record of both CKKS messages, its stage
#: key and stages (``fit``: train and answer with the encrypted update; ``decrypt``: a key holder decrypts the
#: round's encrypted sum), and the keys in it.
SECURE_AGGREGATIONS = ("secagg_plus", "ckks")  # the aggregation names under which no update leaves readable
CKKS_RECORD = "fl-ser.ckks"
CKKS_STAGE = "stage"
CKKS_FIT, CKKS_DECRYPT = "fit", "decrypt"
CKKS_CIPHERTEXTS = "ciphertexts"  # serialized CKKS vectors (fit reply: the update; decrypt request: the sum)
CKKS_KEY_ID = "key_id"            # the public name of the key the update is under (fl_ser.privacy.ckks.key_id)
CKKS_LENGTH = "length"            # decrypt request: how many values the sum holds
CKKS_CONTRIBUTORS = "contributors"  # decrypt request: how many devices' updates the sum holds
CKKS_SUM = "sum"                  # decrypt reply: the sum, rounded to the public grid (float64 bytes)


class PublicError(IntEnum):
    """The only error codes a device sends, each with a fixed text (never text built from local data).

    Flower's own codes are 0-8 (``flwr.common.constant.ErrorCode``); fl-ser's start at 100.
    """

    BUDGET_SPENT = 101
    POLICY_REFUSED = 102
    INCOMPATIBLE_PROTOCOL = 103
    LEDGER_UNAVAILABLE = 104
    DEVICE_FAILED = 110
    BOUNDARY_REFUSED = 111

    @property
    def reason(self) -> str:
        return PUBLIC_REASONS[self]


PUBLIC_REASONS = {
    PublicError.BUDGET_SPENT: "device declined: its privacy budget is spent",
    PublicError.POLICY_REFUSED: "device declined: the request weakens its privacy policy",
    PublicError.INCOMPATIBLE_PROTOCOL: "device declined: incompatible secure aggregation (mask scheme)",
    PublicError.LEDGER_UNAVAILABLE: "device declined: its privacy ledger is unavailable; see its local log",
    PublicError.DEVICE_FAILED: "device failed: see its local log",
    PublicError.BOUNDARY_REFUSED: "device refused: the reply is outside its privacy boundary",
}


# -- Encrypted inference (server/inference_service.py, clients/fhe_client.py) ----------------------------------------
#: The HTTP API of the inference service. ``GET`` the model's public info (JSON: the keys below); ``POST`` the
#: device's public CKKS context with its evaluation keys (raw bytes; JSON reply: the key id); ``POST`` one encrypted,
#: normalised feature vector (raw bytes, the key id in a header; reply: the encrypted logits, raw bytes). Every error
#: is JSON ``{"error": text}`` with a 4xx status (5xx only for the server's own failures).
FHE_MODEL_PATH = "/v1/model"
FHE_KEYS_PATH = "/v1/keys"
FHE_PREDICT_PATH = "/v1/predict"
FHE_KEY_ID_HEADER = "X-FL-SER-Key-Id"
FHE_CONTENT_TYPE = "application/octet-stream"
FHE_LABELS = "labels"              # model info: class names in output order
FHE_INPUT_SIZE = "input_size"      # model info: how many normalised features one ciphertext holds
FHE_CKKS = "ckks"                  # model info: the CKKS parameters the device's context must use (CKKSParams.as_dict)
FHE_MODEL_SHA256 = "model_sha256"  # model info: sha256 of the release's emotion_model.pt (the device's front end)
FHE_SCORES = "scores"              # model info: what the reply decrypts to ("logits": softmax them on the device)
FHE_ROTATION_STEPS = "rotation_steps"  # model info: the rotations the device's Galois keys must cover
FHE_MAX_KEYS_BYTES = "max_keys_bytes"        # model info: the service's size cap of a key upload
FHE_MAX_PREDICT_BYTES = "max_predict_bytes"  # model info: ... and of one prediction request
FHE_KEY_ID = "key_id"              # key reply: the id to send with each prediction (fl_ser.privacy.ckks.key_id)
FHE_ERROR = "error"                # every error reply: what is wrong and what to do
