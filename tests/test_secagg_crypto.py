"""fl-ser's SecAgg+ secret sharing is Flower's, bit for bit in the field and share layout: each side's shares
combine with the other's code, any threshold-sized subset recovers the secret, and fewer shares do not."""

import os
import random

import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto import shamir as flower
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

from fl_ser.privacy import secagg_crypto as ours

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


def test_flower_secagg_plus_uses_fl_ser_crypto_once_installed():
    import importlib

    ours.use_in_flower()
    device = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert device.create_shares is ours.create_shares and device.bytes_to_private_key is ours.private_key
    assert device.generate_key_pairs is ours.key_pair
    assert server.combine_shares is ours.combine_shares
