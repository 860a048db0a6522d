"""Encrypted inference: the emotion classifier evaluated on CKKS ciphertexts, and the device's half around it.

A device standardises its features with the release's own extractor and
normaliser (:func:`device_features`), encrypts them under its own CKKS key
(:func:`encrypt_features`) and sends the ciphertext with its public evaluation
keys; the server evaluates :class:`EncryptedClassifier` on it and returns the
encrypted scores (logits), which only the device can decrypt
(:func:`decrypt_scores`). TenSEAL (Microsoft SEAL) does all the cryptography;
fl-ser only lays out the model's arithmetic on its vectors.

Only models made of what CKKS can evaluate are accepted: ``nn.Linear`` layers
and :class:`~fl_ser.models.classifiers.PolyActivation` (``model=mlp_poly``, or
``model=linear``: an :class:`~fl_ser.models.classifiers.MLP` with no hidden
layer). Each linear layer costs one multiplicative level (``mm``) and each
activation one more (``square``; its coefficients and the hidden biases are
folded into the next layer's weights and bias, so they cost none), so one
hidden layer needs depth 3. :func:`params_for_depth` picks the CKKS parameters a depth needs at
polynomial degree 8192 within 128-bit security, and the classifier refuses
parameters with too few levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl_ser.models.classifiers import MLP, PolyActivation, PolyMLP
from fl_ser.privacy.ckks import (
    MAX_MODULUS_BITS_128,
    CKKSError,
    CKKSParams,
    encrypt,
    key_id,
    load_ciphertexts,
    load_context,
    same_parameters,
)

#: Polynomial degree of encrypted inference: 4096 slots, and room for depth 3 at 128-bit security.
POLY_MODULUS_DEGREE = 8192
SCALE_BITS = 40
FIRST_MODULUS_BITS = 60  # 2^(60-40) of headroom above the scale for the values themselves


class NotFHEFriendly(CKKSError):
    """The model holds an operation CKKS cannot evaluate (ReLU, LayerNorm, convolution, ...)."""


def params_for_depth(depth: int) -> CKKSParams:
    """CKKS parameters for ``depth`` multiplications at degree 8192: a 60-bit first modulus, one 40-bit modulus
    per level and the largest special modulus (at most 60 bits) that 128-bit security leaves."""
    special = min(60, MAX_MODULUS_BITS_128[POLY_MODULUS_DEGREE] - FIRST_MODULUS_BITS - SCALE_BITS * depth)
    if special < SCALE_BITS - 2:
        raise CKKSError(f"a classifier of multiplicative depth {depth} does not fit CKKS degree "
                        f"{POLY_MODULUS_DEGREE} at 128-bit security (depth 3 at most): use one hidden layer "
                        "(model=mlp_poly model.hidden=[32]) or model=linear")
    params = CKKSParams(POLY_MODULUS_DEGREE, (FIRST_MODULUS_BITS, *[SCALE_BITS] * depth, special), SCALE_BITS)
    params.check()
    return params


@dataclass(frozen=True)
class Dense:
    """One linear layer ``x @ weight + bias`` (weight of shape (in, out)), then optionally a quadratic activation
    ``c0 + c1 h + c2 h^2`` given by its coefficients."""

    weight: np.ndarray
    bias: np.ndarray
    activation: tuple[float, float, float] | None


def layers_of(model: nn.Module) -> list[Dense]:
    """The model as a chain of :class:`Dense` layers; :class:`NotFHEFriendly` for anything CKKS cannot evaluate."""
    if not isinstance(model, MLP | PolyMLP):
        raise NotFHEFriendly(f"{type(model).__name__} cannot be evaluated on CKKS ciphertexts: encrypted inference "
                             "needs linear layers and polynomial activations only; train with model=mlp_poly "
                             "(or model=linear)")
    modules = list(model.net)
    refused = sorted({type(m).__name__ for m in modules if not isinstance(m, nn.Linear | PolyActivation)})
    if refused:
        raise NotFHEFriendly(f"{type(model).__name__} uses {', '.join(refused)}, which CKKS cannot evaluate: encrypted "
                             "inference needs linear layers and polynomial activations only; train with "
                             "model=mlp_poly (or model=linear)")
    layers: list[Dense] = []
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().cpu().double().numpy().T.copy()
            layers.append(Dense(weight, module.bias.detach().cpu().double().numpy().copy(), None))
        elif not layers or layers[-1].activation is not None or i == len(modules) - 1:
            raise NotFHEFriendly(f"{type(model).__name__}: a polynomial activation must follow a linear layer and "
                                 "precede another one")
        else:
            layers[-1] = Dense(layers[-1].weight, layers[-1].bias, (module.c0, module.c1, module.c2))
    return layers


class EncryptedClassifier:
    """The classifier's arithmetic on a TenSEAL CKKS vector of the normalised features: returns encrypted logits."""

    def __init__(self, model: nn.Module, params: CKKSParams | None = None):
        self.layers = layers_of(model)
        self.input_size = int(self.layers[0].weight.shape[0])
        self.num_classes = int(self.layers[-1].weight.shape[1])
        self.depth = 1 + 2 * sum(layer.activation is not None for layer in self.layers)
        self.params = params_for_depth(self.depth) if params is None else params
        self.params.check()
        if self.depth > self.params.levels:
            raise CKKSError(f"the classifier needs multiplicative depth {self.depth} but CKKS coefficient moduli "
                            f"{list(self.params.coeff_mod_bit_sizes)} give {self.params.levels} levels: use "
                            f"{list(params_for_depth(self.depth).coeff_mod_bit_sizes)} (params_for_depth) or a "
                            "smaller model")
        if self.input_size > self.params.slots:
            raise CKKSError(f"{self.input_size} features do not fit one ciphertext of {self.params.slots} slots")
        #: The rotations the layers' ``mm`` needs Galois keys for (a device generates only these).
        self.rotation_steps = sorted({d for layer in self.layers for i in range(1, layer.weight.shape[0])
                                      for d in naf(i)})

    def load_keys(self, data: bytes):
        """A client's public context (evaluation keys, no secret key) and its key id; :class:`CKKSError` if the
        bytes are no context, hold a secret key, use other CKKS parameters or lack evaluation keys."""
        ctx = load_context(data, "the key upload")
        if ctx.has_secret_key():
            raise CKKSError("the uploaded context holds a secret key: send only the public context with evaluation "
                            "keys (fl_ser.privacy.ckks.public_bytes(ctx, evaluation_keys=True)); the key that decrypts "
                            "stays on the device")
        if not same_parameters(ctx, self.params):
            raise CKKSError(f"the uploaded context uses other CKKS parameters than this model needs "
                            f"({self.params.as_dict()}; GET the model's info for them)")
        if not (ctx.has_public_key() and ctx.has_relin_keys() and ctx.has_galois_keys()):
            raise CKKSError("the uploaded context lacks its public, relinearisation or Galois keys: give it Galois "
                            "keys (restrict_galois_keys(ctx, the model info's rotation_steps)) and send "
                            "public_bytes(ctx, evaluation_keys=True)")
        ctx.global_scale = 2.0 ** self.params.scale_bits
        ctx.auto_relin, ctx.auto_rescale, ctx.auto_mod_switch = True, True, True
        return key_id(ctx), ctx

    def evaluate(self, ctx, ciphertext: bytes) -> bytes:
        """The encrypted logits (serialized) of one encrypted feature vector under the client's context ``ctx``."""
        (x,) = load_ciphertexts(ctx, [ciphertext], self.params, self.input_size)  # CKKSError: damaged, other size
        try:
            return self._forward(x).serialize()
        except Exception as err:
            raise CKKSError(f"the ciphertext cannot be evaluated ({type(err).__name__}): encrypt a fresh vector "
                            "with the parameters GET /v1/model gives, at their scale, and register Galois keys for "
                            "its rotation steps") from None

    def _forward(self, h):
        # The value is h + offset: biases are kept in the clear and added once, to the logits. TenSEAL adds a plain
        # vector to the first slots only, but the next mm reads the replicas its product leaves in later slots, so a
        # bias added to a hidden layer would be missing there; an activation's offset is folded into the next
        # layer instead: f(h + o) = (c0 + c1 o + c2 o^2) + (c1 + 2 c2 o) h + c2 h^2, elementwise.
        offset = np.zeros(self.input_size)
        pending = None  # the previous layer's activation, applied by this layer
        for layer in self.layers:
            weight = layer.weight
            if pending is None:
                h, offset = h.mm(weight), offset @ weight + layer.bias
            else:
                c0, c1, c2 = pending
                linear = h.mm((c1 + 2 * c2 * offset)[:, None] * weight)
                h = h.square().mm(c2 * weight) + linear
                offset = (c0 + c1 * offset + c2 * offset ** 2) @ weight + layer.bias
            pending = layer.activation
        return h + offset


def naf(step: int) -> list[int]:
    """The non-adjacent form of ``step``: signed powers of two summing to it. SEAL rotates by a step it holds no key
    for as one rotation per NAF digit, so keys for the digits of every step a model uses are all it needs."""
    digits, power = [], 1
    while step:
        if step & 1:
            digit = 2 - (step & 3)  # +1 or -1, so that the next digit is 0
            digits.append(digit * power)
            step -= digit
        step >>= 1
        power <<= 1
    return digits


def restrict_galois_keys(ctx, steps: list[int]) -> None:
    """Replace the secret context's Galois keys with SEAL's keys for exactly ``steps`` (TenSEAL makes keys for every
    power-of-two rotation, 24 at degree 8192; a PolyMLP on 74 features needs 12, half the upload)."""
    from tenseal import sealapi

    if not ctx.has_galois_keys():
        ctx.generate_galois_keys()
    keys = ctx.data.galois_keys()  # the context's own SEAL object: overwritten in place
    sealapi.KeyGenerator(ctx.seal_context().data, ctx.secret_key().data).create_galois_keys(list(steps), keys)
    if ctx.data.galois_keys().size() != len(set(steps)):
        raise CKKSError("TenSEAL did not keep the restricted Galois keys (its key handling changed): upload the full "
                        "set (ctx.generate_galois_keys())")


def device_features(pipeline: nn.Module, wave: np.ndarray) -> np.ndarray:
    """The release's own front end on the device: extractor then normaliser (float64, shape (D,)) of a 16 kHz
    mono waveform; ``pipeline`` is an :class:`~fl_ser.models.pipeline.EmotionPipeline` or its TorchScript."""
    with torch.no_grad():
        feats = pipeline.normalizer(pipeline.extractor(torch.as_tensor(wave, dtype=torch.float32)[None]))
    return feats[0].double().numpy()


def encrypt_features(ctx, features: np.ndarray, params: CKKSParams) -> bytes:
    """One normalised feature vector encrypted under the device's secret context (serialized; one ciphertext)."""
    x = np.asarray(features, dtype=np.float64).ravel()
    if x.size > params.slots:
        raise CKKSError(f"{x.size} features do not fit one ciphertext of {params.slots} slots")
    (blob,) = encrypt(ctx, x, params)  # refuses non-finite values and values the parameters cannot hold
    return blob


def decrypt_scores(ctx, ciphertext: bytes, num_classes: int) -> np.ndarray:
    """The logits from the server's reply, decrypted with the device's secret context; :class:`CKKSError` when the
    reply is no ciphertext of ``num_classes`` finite values under this key."""
    import tenseal as ts

    try:
        scores = ts.ckks_vector_from(ctx, bytes(ciphertext))
        values = np.asarray(scores.decrypt(), dtype=np.float64)
    except Exception as err:
        raise CKKSError(f"the server's reply is not a ciphertext under this device's key ({type(err).__name__})") \
            from None
    if values.shape != (num_classes,) or not np.isfinite(values).all():
        raise CKKSError(f"the server's reply decrypts to {values.size} values (finite: "
                        f"{bool(np.isfinite(values).all())}), the model has {num_classes} classes: the server "
                        "evaluated another model or failed")
    return values
