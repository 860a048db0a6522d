"""The device's versioned model store: every model it receives or personalises, kept side by side, never overwritten.

``root/v0001/``, ``root/v0002/``, ... each hold

* ``emotion_model.pt``: TorchScript, float waveform (1, samples) at 16 kHz -> probabilities (1, C);
* ``labels.json``: the class names in output order;
* ``meta.json``: ``version``, ``round``, ``config_hash``, ``created`` (UTC, ISO 8601), ``sha256`` of the
  artifact, then whatever else the caller recorded (run id, UAR, ``personalised_from``, ...).

A version is written into a hidden ``.tmp-*`` folder, flushed to disk and renamed into place,
so a crash leaves either the whole version or none of it (a stray ``.tmp-*`` folder is ignored).
Everything stays on the device. torch is imported only by :meth:`ModelStore.load`, so a process
that just stores a released model starts fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ARTIFACT = "emotion_model.pt"
LABELS = "labels.json"
META = "meta.json"
#: meta.json keys the store fills in itself.
STORE_KEYS = ("version", "created", "sha256")
#: meta.json keys every caller must give: where the model came from.
ORIGIN_KEYS = ("round", "config_hash")
_VERSION = re.compile(r"^v(\d{4,})$")


class StoreError(RuntimeError):
    """The store cannot give the model asked for: it is empty, lacks that version, or a file is damaged."""


@dataclass(frozen=True)
class StoredModel:
    """One version in the store (its files are read by :meth:`ModelStore.load`)."""

    path: Path  # the version's folder
    version: int
    labels: list[str]
    meta: dict[str, Any]

    @property
    def artifact(self) -> Path:
        return self.path / ARTIFACT


def _damaged(folder: Path) -> str:
    """The fix for a damaged version."""
    return f"Fix: use another version, or delete {folder} and let the device receive the model again."


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


class ModelStore:
    """Versions of the emotion model in ``root`` (created on the first :meth:`add`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def versions(self) -> list[int]:
        """The stored versions, oldest first ([] for an empty or missing store)."""
        if not self.root.is_dir():
            return []
        names = (_VERSION.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in names if m)

    def latest(self) -> StoredModel:
        versions = self.versions()
        if not versions:
            state = "is empty" if self.root.is_dir() else "does not exist"
            raise StoreError(
                f"model store {self.root} {state}: no model has been stored yet. Fix: let this device take part in "
                "a federated run until the server releases its model, or point at the store folder that holds one."
            )
        return self.get(versions[-1])

    def get(self, version: int) -> StoredModel:
        path = self.folder(version)
        if not path.is_dir():
            raise StoreError(
                f"model store {self.root} has no version {version}; it has {self.versions() or 'none'}. "
                "Fix: ask for one of those."
            )
        try:
            labels = json.loads((path / LABELS).read_text())
            meta = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"model version {version} in {path} is damaged ({err}). {_damaged(path)}") from err
        return StoredModel(path, version, labels, meta)

    def add(self, artifact: bytes, labels: Sequence[str], meta: dict[str, Any]) -> StoredModel:
        """Store a TorchScript artifact (its bytes) as the next version; older versions are kept.

        ``meta`` must give ``round`` and ``config_hash`` and may add any JSON values; the store
        records ``version``, ``created`` and the artifact's ``sha256`` itself.
        """
        if not artifact:
            raise ValueError("the artifact is empty; pass the bytes of the TorchScript file (emotion_model.pt)")
        labels = list(labels)
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise ValueError(f"labels must be the model's class names in output order, got {labels!r}")
        taken = [key for key in STORE_KEYS if key in meta]
        if taken:
            raise ValueError(f"meta keys {taken} are filled in by the store; leave them out of meta")
        absent = [key for key in ORIGIN_KEYS if key not in meta]
        if absent:
            raise ValueError(f"meta lacks {absent}: record the federated round and config hash the model came from")
        record: dict[str, Any] = {
            "version": 0,  # set below, once the version number is known
            "round": meta["round"],
            "config_hash": meta["config_hash"],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "sha256": hashlib.sha256(artifact).hexdigest(),
        } | meta
        try:
            _json(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must hold only JSON values (str, number, bool, None, list, dict): {err}") from err

        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            _write(staging / ARTIFACT, artifact)
            _write(staging / LABELS, _json(labels))
            while True:  # another writer may take the next number first: then try the one after
                record["version"] = (self.versions() or [0])[-1] + 1
                _write(staging / META, _json(record))
                target = self.folder(record["version"])
                try:
                    staging.rename(target)
                    break
                except OSError:
                    if not target.exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        directory = os.open(self.root, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.get(record["version"])

    def load(self, version: int | None = None) -> tuple[torch.jit.ScriptModule, list[str], dict[str, Any]]:
        """The model (eval mode, CPU), its labels and meta; the latest version unless one is named.

        Raises :class:`StoreError` for an empty store, a missing version, or an artifact whose
        sha256 differs from the one recorded when it was stored.
        """
        stored = self.latest() if version is None else self.get(version)
        try:
            data = stored.artifact.read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {stored.artifact} ({err}). {_damaged(stored.path)}") from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != stored.meta.get("sha256"):
            raise StoreError(
                f"{stored.artifact} is corrupt: its sha256 is {digest}, but {stored.meta.get('sha256')} was recorded "
                f"when version {stored.version} was stored. {_damaged(stored.path)}"
            )
        import torch

        with warnings.catch_warnings():  # torch.jit's deprecation notice says nothing a device user can act on
            warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
            try:
                model = torch.jit.load(io.BytesIO(data), map_location="cpu")
            except RuntimeError as err:
                raise StoreError(
                    f"{stored.artifact} is not a loadable TorchScript model ({err}). {_damaged(stored.path)}"
                ) from err
        scripted = list(getattr(model, "labels", stored.labels))
        if scripted != stored.labels:
            raise StoreError(
                f"{stored.path}: the model's own labels {scripted} differ from {LABELS} {stored.labels}. "
                f"{_damaged(stored.path)}"
            )
        return model.eval(), stored.labels, stored.meta
