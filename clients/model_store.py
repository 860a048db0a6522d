"""The device's versioned model store: every model it receives or personalises, kept side by side, never overwritten.

``root/v0001/``, ``root/v0002/``, ... each hold

* the model files of the release (:data:`fl_ser.protocol.MODEL_FILES`): ``emotion_model.onnx`` (onnxruntime),
  ``emotion_model.pt2`` (``torch.export``) and ``emotion_model.pt`` (TorchScript), each float waveform
  (B, samples) at 16 kHz -> probabilities (B, C); versions stored before ONNX export hold only
  ``emotion_model.pt``, and still load;
* ``config.yaml``: the resolved config the release was trained with, where the release carried it;
* ``labels.json``: the class names in output order;
* ``meta.json``: ``version``, ``round``, ``config_hash``, ``created`` (UTC, ISO 8601), ``files`` (each
  stored file's sha256), ``sha256`` (the TorchScript file's, as versions before ``files`` recorded it),
  then whatever else the caller recorded (run id, UAR, ``personalised_from``, ...).

A version is written into a hidden ``.tmp-*`` folder, flushed to disk and renamed into place,
so a crash leaves either the whole version or none of it (a stray ``.tmp-*`` folder is ignored).
Every read (:meth:`ModelStore.read`) checks the file's recorded sha256. Everything stays on the device.
torch is imported only by :meth:`ModelStore.load` (the TorchScript module), so a process that stores a
released model or runs it with onnxruntime needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fl_ser.protocol import MODEL_FILES, RELEASE_CONFIG_FILE

ARTIFACT = MODEL_FILES["torchscript"]  # the one model file every version has had
LABELS = "labels.json"
META = "meta.json"
#: The files a version may hold besides labels and meta.
FILES = (*MODEL_FILES.values(), RELEASE_CONFIG_FILE)
#: meta.json keys the store fills in itself.
STORE_KEYS = ("version", "created", "files", "sha256")
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

    @property
    def digests(self) -> dict[str, str]:
        """Each stored file's recorded sha256 (a version from before ``files`` has only the TorchScript file)."""
        return dict(self.meta.get("files") or {ARTIFACT: self.meta.get("sha256")})

    @property
    def formats(self) -> list[str]:
        """The model formats this version holds (keys of :data:`~fl_ser.protocol.MODEL_FILES`)."""
        return [fmt for fmt, name in MODEL_FILES.items() if name in self.digests]


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

    def add(self, files: Mapping[str, bytes], labels: Sequence[str], meta: dict[str, Any]) -> StoredModel:
        """Store a model's files (name -> bytes, names from :data:`FILES`) as the next version; older ones are kept.

        ``files`` must hold ``emotion_model.pt`` (TorchScript), and should hold every format of the release.
        ``meta`` must give ``round`` and ``config_hash`` and may add any JSON values; the store records
        ``version``, ``created`` and each file's ``sha256`` itself.
        """
        unknown = sorted(set(files) - set(FILES))
        if unknown:
            raise ValueError(f"files {unknown} are not release files; a version holds only {list(FILES)}")
        empty = sorted(name for name in FILES if name in files and not files[name])
        if ARTIFACT not in files or empty:
            raise ValueError(f"files must include {ARTIFACT} (TorchScript), and none may be empty (empty: {empty}); "
                             "pass the bytes of the release folder's files")
        labels = list(labels)
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise ValueError(f"labels must be the model's class names in output order, got {labels!r}")
        taken = [key for key in STORE_KEYS if key in meta]
        if taken:
            raise ValueError(f"meta keys {taken} are filled in by the store; leave them out of meta")
        absent = [key for key in ORIGIN_KEYS if key not in meta]
        if absent:
            raise ValueError(f"meta lacks {absent}: record the federated round and config hash the model came from")
        digests = {name: hashlib.sha256(files[name]).hexdigest() for name in FILES if name in files}
        record: dict[str, Any] = {
            "version": 0,  # set below, once the version number is known
            "round": meta["round"],
            "config_hash": meta["config_hash"],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": digests,
            "sha256": digests[ARTIFACT],
        } | meta
        try:
            _json(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must hold only JSON values (str, number, bool, None, list, dict): {err}") from err

        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            for name in digests:
                _write(staging / name, files[name])
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

    def read(self, stored: StoredModel, name: str) -> bytes:
        """The bytes of one of the version's files, checked against the sha256 recorded when it was stored."""
        expected = stored.digests.get(name)
        if expected is None:
            raise StoreError(f"model version {stored.version} in {stored.path} has no {name}; it holds "
                             f"{sorted(stored.digests)}. Fix: use a version that has it")
        path = stored.path / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {path} ({err}). {_damaged(stored.path)}") from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise StoreError(
                f"{path} is corrupt: its sha256 is {digest}, but {expected} was recorded "
                f"when version {stored.version} was stored. {_damaged(stored.path)}"
            )
        return data

    def load(self, version: int | None = None) -> tuple[torch.jit.ScriptModule, list[str], dict[str, Any]]:
        """The TorchScript model (eval mode, CPU), its labels and meta; the latest version unless one is named.

        Raises :class:`StoreError` for an empty store, a missing version, or an artifact whose
        sha256 differs from the one recorded when it was stored.
        """
        from fl_ser.models.runtimes import load_torchscript

        stored = self.latest() if version is None else self.get(version)
        data = self.read(stored, ARTIFACT)
        try:
            model = load_torchscript(data)
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
        return model, stored.labels, stored.meta
