"""CKKS homomorphic encryption (TenSEAL over Microsoft SEAL): keys, packing, the server's keyless context, rounding.

fl-ser writes no lattice cryptography. TenSEAL 0.3.18 wraps Microsoft SEAL's
CKKS (Cheon-Kim-Kim-Song 2017), and everything here is parameters, packing and
file handling around it:

* **Parameters** (:class:`CKKSParams`): SEAL refuses, at context creation, any
  coefficient modulus larger than the HomomorphicEncryption.org standard
  allows for 128-bit security at the chosen polynomial degree (its default
  ``sec_level_type.tc128``), so every context fl-ser makes is at least 128-bit
  secure; :meth:`CKKSParams.check` says so before TenSEAL does, in words.
* **Packing** (:func:`encrypt`): the model's arrays, flattened, fill each
  ciphertext's ``N/2`` slots, so a vector never exceeds one ciphertext (TenSEAL
  would otherwise print its "does not fit in a single ciphertext" warning and
  fall back to a slower layout) and a device sends as few as the slots allow.
* **The server's context** (:func:`keyless_context`): adding ciphertexts needs
  only the encryption parameters. The server builds a context from the public
  parameters alone and drops its secret key at once; it never holds the
  federation's keys, and a ciphertext under other parameters fails to load.
* **Exact sums** (:func:`quantise`, :func:`decrypt`): CKKS decryption is
  approximate and its error depends on the secret key; Li and Micciancio
  (EUROCRYPT 2021) recover the key from decrypted results released as they
  are. So every device first rounds its values to a public power-of-two grid
  (``precision``; for distributed DP, SecAgg+'s own grid), the sum of grid
  values is again on the grid, and the key holder releases only the decrypted
  sum rounded back to the grid. While the CKKS error stays below half a step,
  that is exactly the sum of the devices' rounded plaintexts: a function of the
  plaintexts alone, carrying nothing of the key. :func:`decrypt` checks the
  error against a quarter step and withholds the values otherwise
  (:class:`CKKSPrecisionError`).
* **Key files** (:func:`write_secret_context`): the secret context is written
  with mode 0600, atomically, and never overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: SEAL's largest total coefficient modulus (bits) per polynomial degree for 128-bit classical security
#: (HomomorphicEncryption.org standard, SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)``).
MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CKKSError(ValueError):
    """A CKKS setting, key or ciphertext that fl-ser cannot use; the message says which and what to do."""


class CKKSPrecisionError(CKKSError):
    """Decrypted values not far enough inside the rounding grid: releasing them could leak the key."""


@dataclass(frozen=True)
class CKKSParams:
    """Public CKKS parameters: polynomial degree N, the coefficient moduli's bit sizes and the scale 2^bits."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 40

    @classmethod
    def from_config(cls, section) -> CKKSParams:
        """From a mapping with the keys of :meth:`as_dict` (a config section, or JSON), checked."""
        params = cls(int(section["poly_modulus_degree"]), tuple(int(b) for b in section["coeff_mod_bit_sizes"]),
                     int(section["scale_bits"]))
        params.check()
        return params

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """Multiplications (rescalings) a fresh ciphertext affords."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def max_abs_value(self) -> float:
        """Plaintext values must stay below this: the first modulus keeps 2^(first - scale) of headroom (halved)."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1)

    def check(self) -> None:
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in MAX_MODULUS_BITS_128:
            raise CKKSError(f"CKKS poly_modulus_degree {n} is not one of {sorted(MAX_MODULUS_BITS_128)}")
        if sum(bits) > MAX_MODULUS_BITS_128[n]:
            raise CKKSError(f"CKKS coefficient moduli {list(bits)} total {sum(bits)} bits, above the "
                            f"{MAX_MODULUS_BITS_128[n]} bits that 128-bit security allows at degree {n}: use fewer "
                            "or smaller moduli, or a larger poly_modulus_degree")
        if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits):
            raise CKKSError(f"CKKS coefficient moduli {list(bits)}: give at least two, each of 20 to 60 bits")
        if not 20 <= self.scale_bits < bits[0]:
            raise CKKSError(f"CKKS scale_bits {self.scale_bits} must be at least 20 and below the first modulus "
                            f"({bits[0]} bits)")

    def as_dict(self) -> dict:
        return {"poly_modulus_degree": self.poly_modulus_degree, "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "scale_bits": self.scale_bits}


def new_context(params: CKKSParams, *, galois: bool = False):
    """A fresh secret context (keys from SEAL's CSPRNG, relinearisation keys included); ``galois``: also rotation
    keys (encrypted inference)."""
    import tenseal as ts

    params.check()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.scale_bits
    if galois:
        ctx.generate_galois_keys()
    return ctx


def keyless_context(params: CKKSParams):
    """A context that can load and add ciphertexts of ``params`` and decrypt nothing: its own secret key,
    generated because TenSEAL always makes one, is dropped before the context is used."""
    ctx = new_context(params)
    ctx.make_context_public()
    return ctx


def public_bytes(ctx, *, evaluation_keys: bool = False) -> bytes:
    """The context without its secret key (``evaluation_keys``: with relinearisation and rotation keys)."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=evaluation_keys,
                         save_relin_keys=evaluation_keys)


def key_id(ctx) -> str:
    """A public name of the context's key: SHA-256 of its public key (16 hex digits). Devices and the server
    compare it to tell a ciphertext under the federation's key from one under another."""
    return hashlib.sha256(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                        save_relin_keys=False)).hexdigest()[:16]


def load_context(data: bytes, what: str):
    import tenseal as ts

    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises ValueError or its own C++ errors for bad bytes
        raise CKKSError(f"{what} is not a TenSEAL context ({type(err).__name__}); it is damaged or not a key "
                        "file") from None


def write_secret_context(path: str | Path, ctx) -> Path:
    """Write the secret context to ``path`` (mode 0600, atomically); an existing key file is never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if another process wrote the key first: its key wins, ours is discarded
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path


def open_secret_context(path: str | Path, params: CKKSParams):
    """The secret context in ``path``, made (fresh keys, mode 0600) if there is none yet: a concurrent writer's
    key wins and both then read it (:func:`write_secret_context`)."""
    if not Path(path).is_file():
        write_secret_context(path, new_context(params))
    return read_secret_context(path, params)


def read_secret_context(path: str | Path, params: CKKSParams):
    """The secret context in ``path``, checked to hold a secret key of ``params``."""
    path = Path(path)
    if not path.is_file():
        raise CKKSError(f"no CKKS key file at {path}: give the path of the CKKS key (for aggregation=ckks, "
                        "experiments.lab prepare writes the federation's key into each device's folder)")
    if path.stat().st_mode & 0o077:
        raise CKKSError(f"CKKS key file {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); "
                        f"`chmod 600 {path}`")
    ctx = load_context(path.read_bytes(), f"CKKS key file {path}")
    if not ctx.has_secret_key():
        raise CKKSError(f"CKKS key file {path} holds no secret key")
    ctx.global_scale = 2.0 ** params.scale_bits
    if not same_parameters(ctx, params):
        raise CKKSError(f"CKKS key file {path} was made with other parameters than the ones expected "
                        f"({params.as_dict()}): the key belongs to another federation or model")
    return ctx


@functools.lru_cache(maxsize=8)
def _parms_id(params: CKKSParams) -> tuple[int, ...]:
    import tenseal as ts

    probe = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                       coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    return tuple(probe.seal_context().data.key_parms_id())


def same_parameters(ctx, params: CKKSParams) -> bool:
    """Whether the TenSEAL context ``ctx`` was made with ``params`` (SEAL's hash of the encryption parameters,
    ``parms_id``, which it also checks when a ciphertext is loaded)."""
    return tuple(ctx.seal_context().data.key_parms_id()) == _parms_id(params)


def check_precision(precision: float) -> float:
    if not (precision > 0 and math.frexp(precision)[0] == 0.5):
        raise CKKSError(f"CKKS precision {precision} must be a power of two (e.g. 2**-20): only then is a sum of "
                        "grid values exactly on the grid")
    return float(precision)


def quantise(values: np.ndarray, precision: float) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``precision``: what a device encrypts."""
    step = check_precision(precision)
    return np.round(np.asarray(values, dtype=np.float64) / step) * step


def slot_chunks(length: int, params: CKKSParams) -> int:
    """How many ciphertexts a vector of ``length`` values takes."""
    return max(1, math.ceil(length / params.slots))


def encrypt(ctx, values: np.ndarray, params: CKKSParams) -> list[bytes]:
    """``values`` (flat, float64) as serialized CKKS ciphertexts of ``N/2`` slots each."""
    import tenseal as ts

    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size and not np.isfinite(flat).all():
        raise CKKSError("refusing to encrypt non-finite values")
    if flat.size and np.abs(flat).max() >= params.max_abs_value:
        raise CKKSError(f"values up to {np.abs(flat).max():.3g} exceed what the CKKS parameters hold "
                        f"(|x| < {params.max_abs_value:g}); raise the first modulus or lower scale_bits")
    return [ts.ckks_vector(ctx, flat[i:i + params.slots].tolist()).serialize()
            for i in range(0, max(flat.size, 1), params.slots)]


def load_ciphertexts(ctx, blobs: Sequence[bytes], params: CKKSParams, length: int) -> list:
    """Deserialize ciphertexts of a vector of ``length`` values under ``ctx``; :class:`CKKSError` if malformed."""
    import tenseal as ts

    want = slot_chunks(length, params)
    if len(blobs) != want:
        raise CKKSError(f"{len(blobs)} ciphertexts, a vector of {length} values takes {want}")
    out = []
    for i, blob in enumerate(blobs):
        try:
            vec = ts.ckks_vector_from(ctx, bytes(blob))
        except Exception as err:
            raise CKKSError(f"ciphertext {i} does not load under the expected CKKS parameters "
                            f"({type(err).__name__})") from None
        expected = min(params.slots, length - i * params.slots)
        if vec.size() != expected:
            raise CKKSError(f"ciphertext {i} holds {vec.size()} values, expected {expected}")
        out.append(vec)
    return out


def add_all(vectors: Sequence[Sequence]) -> list:
    """The slot-wise sum of several devices' ciphertext lists (each the same length)."""
    total = [v.copy() for v in vectors[0]]
    for other in vectors[1:]:
        for t, v in zip(total, other, strict=True):
            t += v
    return total


def decrypt(ctx, vectors: Sequence, precision: float, length: int) -> np.ndarray:
    """The exact sum of grid values from their encrypted sum: decrypt, round to the ``precision`` grid, and
    refuse (:class:`CKKSPrecisionError`) when any value lies more than a quarter step off the grid."""
    precision = check_precision(precision)
    raw = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])[:length]
    steps = np.round(raw / precision)
    error = float(np.abs(raw - steps * precision).max()) if raw.size else 0.0
    if error > precision / 4:
        raise CKKSPrecisionError(f"CKKS decryption error {error:.3g} is not below a quarter of the grid "
                                 f"{precision:g}: values not on the grid were encrypted, the sum is too large for "
                                 "the scale, or the ciphertexts are damaged; the decrypted values are withheld")
    return steps * precision
