"""The lab's key material: a certificate authority, the SuperLink's TLS certificate, one key pair per device.

``prepare_lab`` writes a lab folder that a trial needs and nothing else::

    lab/
      lab.json                    hosts, device names, file layout (no secrets)
      ca/ca.crt  ca/ca.key        the lab's CA (keep ca.key offline after preparing)
      superlink/server.crt        TLS certificate, SANs = the hosts given (+ localhost, 127.0.0.1)
      superlink/server.key
      superlink/enrolled/device-NN.pub   the device public keys the SuperLink admits
      devices/device-NN/node.key  the device's private key (OpenSSH EC P-384, as Flower expects)
      devices/device-NN/node.pub
      devices/device-NN/ca.crt    the CA certificate the device uses to check the SuperLink
      devices/device-NN/ckks/secret.key   the federation's CKKS key (aggregation=ckks; the same for every device)

Private keys are written with mode 0600 inside 0700 folders, and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from experiments.deployment import DeploymentError
from fl_ser.privacy.ckks import CKKSParams, new_context, write_secret_context

LAB_FILE = "lab.json"
VALID_DAYS = 365
CURVE = ec.SECP384R1  # a NIST curve: Flower's node authentication accepts only those


class LabError(DeploymentError):
    """The lab folder or its arguments are unusable; the message says what to do."""


@dataclass(frozen=True)
class Lab:
    """A prepared lab folder, as described by its ``lab.json``."""

    root: Path
    hosts: tuple[str, ...]
    devices: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    def enrolled_key(self, device: str) -> Path:
        return self.root / "superlink" / "enrolled" / f"{device}.pub"

    def device_dir(self, device: str) -> Path:
        return self.root / "devices" / device

    def device_key(self, device: str) -> Path:
        return self.device_dir(device) / "node.key"

    def ckks_key(self, device: str) -> Path:
        return self.device_dir(device) / "ckks" / "secret.key"

    @property
    def secrets(self) -> list[Path]:
        """Every private key in the lab (for the checks that none leaks into logs or outputs)."""
        return [self.root / "ca" / "ca.key", self.server_key, *(self.device_key(d) for d in self.devices)]

    @classmethod
    def load(cls, root: str | Path) -> Lab:
        root = Path(root).expanduser().resolve()
        spec = root / LAB_FILE
        if not spec.is_file():
            raise LabError(f"{root} is not a lab folder (no {LAB_FILE}). Create one with "
                           f"`python -m experiments.lab prepare --devices N --hosts HOST --out {root}`.")
        info = json.loads(spec.read_text())
        lab = cls(root, tuple(info["hosts"]), tuple(info["devices"]))
        needed = (lab.ca_cert, lab.server_cert, *lab.secrets[1:])  # the CA key may already be stored offline
        missing = [str(p.relative_to(root)) for p in needed if not p.is_file()]
        if missing:
            raise LabError(f"lab {root} is incomplete, missing {missing}; prepare it again with --out {root}")
        return lab


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if secret else 0o755)
    if secret:
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if secret else 0o644)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: x509.Name | None, signer, *, ca: bool,
                 hosts: tuple[str, ...] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl-ser lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA384())


def device_names(num_devices: int) -> tuple[str, ...]:
    return tuple(f"device-{i:02d}" for i in range(num_devices))


def prepare_lab(out: str | Path, num_devices: int, hosts: list[str], overwrite: bool = False) -> Lab:
    """Create the CA, the SuperLink certificate for ``hosts`` and ``num_devices`` enrolled device key pairs."""
    root = Path(out).expanduser().resolve()
    if num_devices < 2:
        raise LabError(f"--devices {num_devices}: a federation with SecAgg+ needs at least 2 devices")
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise LabError("--hosts is empty: give the SuperLink's host name(s) or IP address(es) the devices will use")
    if (root / LAB_FILE).exists() and not overwrite:
        raise LabError(f"{root} already holds a lab; pass --force to replace its keys (devices must be re-keyed)")
    # The devices may reach the SuperLink by any of these names; loopback is always included for rehearsals.
    names = tuple(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    ca_key = ec.generate_private_key(CURVE())
    ca_cert = _certificate("fl-ser lab CA", ca_key.public_key(), None, ca_key, ca=True)
    server_key = ec.generate_private_key(CURVE())
    server_cert = _certificate(names[0], server_key.public_key(), ca_cert.subject, ca_key, ca=False, hosts=names)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    lab = Lab(root, names, device_names(num_devices))
    ckks = new_context(CKKSParams())  # aggregation=ckks's default parameters; one key the devices share
    _write(root / "ca" / "ca.key", _pem_key(ca_key), secret=True)
    _write(lab.ca_cert, ca_pem)
    _write(lab.server_key, _pem_key(server_key), secret=True)
    _write(lab.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for device in lab.devices:
        key = ec.generate_private_key(CURVE())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public += f" {device}\n".encode()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        _write(lab.device_key(device), private, secret=True)
        _write(lab.device_dir(device) / "node.pub", public)
        _write(lab.device_dir(device) / "ca.crt", ca_pem)
        _write(lab.enrolled_key(device), public)
        if overwrite:
            lab.ckks_key(device).unlink(missing_ok=True)
        write_secret_context(lab.ckks_key(device), ckks)
    _write(root / LAB_FILE, (json.dumps({"hosts": list(names), "devices": list(lab.devices),
                                          "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                          "valid_days": VALID_DAYS}, indent=2) + "\n").encode())
    return lab
