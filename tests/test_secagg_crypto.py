"""fl-ser's SecAgg+ secret sharing is Flower's, bit for bit in the field and share layout: each side's shares
combine with the other's code, any threshold-sized subset recovers the secret, and fewer shares do not. Its mask
PRG (HKDF-SHA256 + ChaCha20) is deterministic per seed, uniform, uses the whole seed, and refuses biased ranges."""

import os
import random

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto import shamir as flower
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_prg
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

from fl_ser.privacy import secagg_crypto as ours
from fl_ser.protocol import MASK_SCHEME

rng = random.Random(0)


@pytest.mark.parametrize("a", [1, 2, 0x87, (1 << 127) | 5, *[rng.getrandbits(128) for _ in range(50)]])
def test_field_arithmetic_matches_pycryptodome(a):
    b = rng.getrandbits(128)
    assert ours._multiply(a, b) == int(_Element(a) * _Element(b))
    assert ours._inverse(a) == int(_Element(a).inverse())
    assert ours._multiply(a, ours._inverse(a)) == 1


# secret lengths around chunk borders; SecAgg+ shares a 32-byte seed and a PEM private key (~300 bytes)
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 32, 306])
@pytest.mark.parametrize("threshold, num", [(1, 1), (2, 3), (9, 15), (5, 5), (20, 31)])
def test_shares_interoperate_with_flower(length, threshold, num):
    secret = os.urandom(length)
    mine, theirs = ours.create_shares(secret, threshold, num), flower.create_shares(secret, threshold, num)
    assert [len(s) for s in mine] == [len(s) for s in theirs]
    assert [s[:4] for s in mine] == [s[:4] for s in theirs]  # same 1-based little-endian indices
    for _ in range(3):
        assert flower.combine_shares(rng.sample(mine, threshold)) == secret
        assert ours.combine_shares(rng.sample(theirs, threshold)) == secret
        assert ours.combine_shares(rng.sample(mine, min(num, threshold + 1))) == secret


def test_fewer_shares_than_the_threshold_do_not_recover_the_secret():
    secret = os.urandom(32)
    shares = ours.create_shares(secret, 5, 9)
    try:
        assert ours.combine_shares(shares[:4]) != secret
    except ValueError:
        pass  # the padding check usually fails first
    with pytest.raises(ValueError, match="Duplicate"):
        ours.combine_shares([shares[0], shares[0]])


def test_shares_are_fresh_each_time():
    secret = os.urandom(32)
    assert ours.create_shares(secret, 3, 5)[1:] != ours.create_shares(secret, 3, 5)[1:]


def test_bad_share_counts_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        ours.create_shares(b"x", 4, 3)


def test_p256_keys_agree_through_flowers_key_functions():
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    (sk1, pk1), (sk2, pk2) = ours.key_pair(), ours.key_pair()
    assert sk1.curve.name == "secp256r1"
    pem1 = private_key_to_bytes(sk1)
    k12 = generate_shared_key(ours.private_key(pem1), bytes_to_public_key(public_key_to_bytes(pk2)))
    k21 = generate_shared_key(sk2, pk1)
    assert k12 == k21 and decrypt(k21, encrypt(k12, b"share")) == b"share"


def test_private_key_parses_like_flower():
    sk, _ = generate_key_pairs()
    pem = private_key_to_bytes(sk)
    parsed = ours.private_key(pem)
    assert private_key_to_bytes(parsed) == pem and ours.private_key(pem) is parsed


DEFAULT_MODEL = [(16, 74), (16,), (16,), (16,), (7, 16), (7,)]  # the default MLP: 1,351 parameters


def test_mask_prg_is_deterministic_per_seed_and_differs_between_seeds():
    seed = os.urandom(32)
    first, again = ours.mask_prg(seed, 1 << 32, DEFAULT_MODEL), ours.mask_prg(seed, 1 << 32, DEFAULT_MODEL)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = ours.mask_prg(os.urandom(32), 1 << 32, DEFAULT_MODEL)
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True) if a.size > 4)
    assert [a.shape for a in first] == DEFAULT_MODEL and all(a.dtype == np.int64 for a in first)


def test_mask_prg_known_answer():
    """The scheme's output is fixed: a device and a server of different fl-ser versions that both announce
    MASK_SCHEME must expand the same masks. Changing these values needs a new scheme version in fl_ser.protocol."""
    assert MASK_SCHEME == "hkdf-sha256+chacha20/v1"
    matrix, scalar = ours.mask_prg(bytes(range(32)), 1 << 32, [(2, 3), ()])
    assert matrix.tolist() == [[3855041108, 27183250, 299485829], [3880596413, 2860711988, 2498172657]]
    assert scalar.shape == () and int(scalar) == 3765920862
    assert ours.mask_prg(bytes(range(32)), 1 << 40, [(3,)])[0].tolist() == [630920266324, 812048304773,
                                                                            1037947830324]


@pytest.mark.parametrize("bits", [4, 22, 32, 40, 63])
def test_mask_prg_is_uniform_over_power_of_two_ranges(bits):
    from scipy.stats import chisquare

    values = np.concatenate([a.ravel() for a in ours.mask_prg(os.urandom(32), 1 << bits, [(50_000,), (3, 10_000)])])
    assert values.min() >= 0 and values.max() < 1 << bits and values.max() > (1 << bits) * 0.9
    top = values >> (bits - 4)  # the top 4 bits: 16 equally likely bins
    assert chisquare(np.bincount(top, minlength=16)).pvalue > 1e-4
    low = values & 15  # ... and the bottom 4
    assert chisquare(np.bincount(low, minlength=16)).pvalue > 1e-4
    assert abs(values.mean() / ((1 << bits) - 1) - 0.5) < 0.01


def test_seeds_that_fold_alike_get_different_masks():
    """Flower folds the seed to 32 bits (XOR of its 4-byte words): two seeds with the same fold get the same
    Mersenne Twister masks. fl-ser's PRG uses the whole seed."""
    a = bytearray(os.urandom(32))
    b = bytearray(a)
    delta = os.urandom(4)
    for word in (0, 5):  # flip the same bits in two words: the XOR fold is unchanged
        b[4 * word:4 * word + 4] = bytes(x ^ d for x, d in zip(b[4 * word:4 * word + 4], delta, strict=True))
    assert a != b
    flower_a, flower_b = flower_prg(bytes(a), 1 << 32, DEFAULT_MODEL), flower_prg(bytes(b), 1 << 32, DEFAULT_MODEL)
    assert all(np.array_equal(x, y) for x, y in zip(flower_a, flower_b, strict=True))
    ours_a, ours_b = ours.mask_prg(bytes(a), 1 << 32, DEFAULT_MODEL), ours.mask_prg(bytes(b), 1 << 32, DEFAULT_MODEL)
    assert not any(np.array_equal(x, y) for x, y in zip(ours_a, ours_b, strict=True))


@pytest.mark.parametrize("num_range", [0, 1, 3, 1000, (1 << 32) - 1, 3 << 20, 1 << 64])
def test_mask_prg_refuses_ranges_that_would_bias_the_masks(num_range):
    with pytest.raises(ValueError, match="power of two"):
        ours.mask_prg(os.urandom(32), num_range, [(3,)])


def test_mask_prg_refuses_short_seeds():
    with pytest.raises(ValueError, match="128 bits"):
        ours.mask_prg(os.urandom(8), 1 << 32, [(3,)])


def test_mask_prg_handles_scalars_and_empty_shapes_as_flower_does():
    dims = [(), (3, 4), (0,), (2, 1, 2), ()]
    mine, theirs = ours.mask_prg(os.urandom(32), 1 << 32, dims), flower_prg(os.urandom(32), 1 << 32, dims)
    assert [a.shape for a in mine] == [a.shape for a in theirs] == dims
    assert [a.dtype for a in mine] == [a.dtype for a in theirs]
    assert ours.mask_prg(os.urandom(32), 1 << 32, []) == []
    assert mine[0] != mine[4]  # two scalars take different keystream words
