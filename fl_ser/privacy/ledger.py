"""The device's lifetime privacy ledger, on its own disk: every mechanism ever applied to each of its utterances.

Spent privacy is never forgotten. A device's ledger is a JSON file in a folder of
its own (``device-dir/privacy/`` on a SuperNode; ``privacy.ledger_dir``, one
file per device, in simulation), keyed by the data it protects:

* every utterance is identified by the SHA-256 of its decoded audio, so the
  same recording is the same utterance whatever its file is called;
* every *event* (a normaliser release, a DP-SGD round) records its mechanisms
  as Opacus accountant entries ``(z, q, steps)`` and the set (*cohort*) of
  utterances it touched; a distributed DP-GD round (:mod:`fl_ser.privacy.distributed`)
  also records ``local_mechanisms``: what its share carries against anyone who
  sees this device's own update, reported as ``epsilon_local``;
* an utterance's epsilon composes every event it was in, and the device's
  epsilon is the largest over the utterances it holds now. Adding recordings
  therefore starts the new ones at zero without resetting the old ones, and a
  new run on the same recordings continues from their stored total.

Write-ahead: :meth:`Book.record` writes the event atomically (temporary file,
fsync, rename, fsync of the folder) before the caller lets anything derived
from it leave the device, so a crash after training counts as spent. While a
book is open its ledger is locked (``fcntl.flock``): two runs on one device
cannot both spend the same budget; the second waits, then declines.

A ledger that cannot be trusted is never read as "nothing spent": a file that
does not parse, fails its checksum, or has gone missing while the folder's
index (``index.json``) says it existed raises
:class:`~fl_ser.privacy.refusals.LedgerUnavailable`, and the device refuses to
train until a person restores it (the message names the file).

:func:`spend_round` is how a device spends: one DP-SGD round under its open
book, lifetime budget checked first, normaliser released if its data has none
yet, the spend recorded before anything derived from it can leave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fl_ser.durable import write_atomically
from fl_ser.privacy.accountant import Entry, epsilon
from fl_ser.privacy.refusals import LedgerUnavailable
from fl_ser.protocol import EPSILON_METRICS

log = logging.getLogger("fl_ser.device")

FORMAT = "fl-ser.ledger/1"
INDEX = "index.json"
LOCK_WAIT_S = 30.0
KINDS = ("normalization", "training")


def utterance_id(wave_bytes: bytes) -> str:
    """The identity of an utterance: SHA-256 of its decoded audio (float32, 16 kHz)."""
    return hashlib.sha256(wave_bytes).hexdigest()[:32]


def _checksum(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path, what: str, wait_s: float) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed); decline after ``wait_s`` seconds of waiting."""
    deadline = time.monotonic() + wait_s
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise LedgerUnavailable(f"{what} is in use by another run on this device ({holder}) and was "
                                            f"still locked after {wait_s:.0f} s: two runs cannot spend one budget "
                                            "at the same time; wait for the other run or stop it") from None
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclass
class Book:
    """An open ledger (its lock held): what was spent, and where new spending is recorded."""

    path: Path
    ledger_id: str
    events: list[dict] = field(default_factory=list)
    cohorts: dict[str, list[str]] = field(default_factory=dict)
    normalizers: dict[str, dict] = field(default_factory=dict)  # normalisation key -> {"cohort", "statistics"}
    created: str = ""

    # -- reading -----------------------------------------------------------
    def _groups(self, ids: Iterable[str]) -> list[list[int]]:
        """The distinct sets of event indices that cover the utterances ``ids``."""
        members = {cid: set(u) for cid, u in self.cohorts.items()}
        return [list(sig) for sig in {tuple(i for i, e in enumerate(self.events) if u in members[e["cohort"]])
                                      for u in ids}]

    def entries(self, ids: Iterable[str], kinds: Iterable[str] = KINDS, run: str | None = None,
                local: bool = False) -> list[list[Entry]]:
        """Per group of utterances, the mechanism entries that touched it (optionally only some kinds / one run;
        ``local``: what each event carries against anyone who sees this device's own update)."""
        kinds = set(kinds)
        key = "local_mechanisms" if local else "mechanisms"
        return [[tuple(m) for i in group for m in self.events[i].get(key, self.events[i]["mechanisms"])
                 if self.events[i]["kind"] in kinds and (run is None or self.events[i]["run"] == run)]
                for group in self._groups(ids)]

    def epsilon(self, ids: Iterable[str], delta: float, mechanism: str = "rdp", planned: Iterable[Entry] = (),
                kinds: Iterable[str] = KINDS, run: str | None = None, local: bool = False) -> float:
        """The largest epsilon of any utterance in ``ids``, after ``planned`` more entries applied to all of them."""
        ids, planned = list(ids), list(planned)
        groups = self.entries(ids, kinds, run, local) if ids else []
        return max((epsilon([*g, *planned], delta, mechanism) for g in groups), default=epsilon(planned, delta,
                                                                                              mechanism))

    def epsilons(self, ids: Iterable[str], delta: float, mechanism: str, run: str) -> dict[str, float]:
        """The device's reported epsilons (:data:`~fl_ser.protocol.EPSILON_METRICS`): lifetime total, this run's,
        the normalisation and training parts, and the lifetime total against a view of its own update."""
        ids = list(ids)
        values = (self.epsilon(ids, delta, mechanism), self.epsilon(ids, delta, mechanism, run=run),
                  self.epsilon(ids, delta, mechanism, kinds=("normalization",)),
                  self.epsilon(ids, delta, mechanism, kinds=("training",)),
                  self.epsilon(ids, delta, mechanism, local=True))
        return dict(zip(EPSILON_METRICS, values, strict=True))

    def released_statistics(self, key: str, ids: Iterable[str]) -> dict | None:
        """A normaliser release made earlier for exactly these utterances and settings (reusing it is free)."""
        entry = self.normalizers.get(key)
        if entry is None or sorted(self.cohorts.get(entry["cohort"], [])) != sorted(ids):
            return None
        return entry["statistics"]

    # -- writing (write-ahead) -------------------------------------------------
    def record(self, kind: str, mechanisms: Iterable[Entry], ids: Iterable[str], run: str, round_: int | None,
               statistics: tuple[str, dict] | None = None, local: Iterable[Entry] | None = None) -> None:
        """Append one event and make it durable before returning; ``statistics`` = (normalisation key, release);
        ``local``: the event's entries against a view of this device's own update, where they differ."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger event kind {kind!r}")
        cohort = self._cohort(ids)
        event = {"kind": kind, "run": run, "round": round_, "cohort": cohort,
                 "time": datetime.now(UTC).isoformat(timespec="seconds"),
                 "mechanisms": [[float(z), float(q), int(n)] for z, q, n in mechanisms]}
        if local is not None:
            event["local_mechanisms"] = [[float(z), float(q), int(n)] for z, q, n in local]
        self.events.append(event)
        if statistics is not None:
            self.normalizers[statistics[0]] = {"cohort": cohort, "statistics": statistics[1]}
        self._save()

    def _cohort(self, ids: Iterable[str]) -> str:
        ids = sorted(set(ids))
        cid = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
        self.cohorts.setdefault(cid, ids)
        return cid

    def _payload(self) -> dict:
        return {"format": FORMAT, "ledger_id": self.ledger_id, "created": self.created, "events": self.events,
                "cohorts": self.cohorts, "normalizers": self.normalizers}

    def _save(self) -> None:
        payload = self._payload()
        write_atomically(self.path, json.dumps({**payload, "sha256": _checksum(payload)}, indent=1) + "\n")


class LifetimeLedger:
    """The ledger of one device's data in ``folder`` (named ``name``; the folder's index remembers it existed)."""

    def __init__(self, folder: str | Path, name: str = "ledger", lock_wait_s: float = LOCK_WAIT_S):
        self.folder = Path(folder)
        self.name = name
        self.path = self.folder / f"{name}.json"
        self.lock_wait_s = lock_wait_s

    @contextlib.contextmanager
    def open(self) -> Iterator[Book]:
        """Lock the ledger and read it (creating it on first use); records made in the block are durable."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / f"{self.name}.lock", f"privacy ledger {self.path}", self.lock_wait_s):
            yield self._load()

    def _load(self) -> Book:
        known = self._index().get(self.name)
        if not self.path.exists():
            if known is not None:
                raise LedgerUnavailable(
                    f"privacy ledger {self.path} is missing, but {self.folder / INDEX} records that it existed "
                    f"(ledger {known}): the device will not train as if nothing had been spent. Restore the file "
                    "from a backup; only if this data's privacy history is truly lost, remove its entry from the "
                    "index deliberately.")
            book = Book(self.path, str(uuid.uuid4()), created=datetime.now(UTC).isoformat(timespec="seconds"))
            book._save()
            self._remember(book.ledger_id)
            return book
        try:
            data = json.loads(self.path.read_text())
            payload = {k: data[k] for k in ("format", "ledger_id", "created", "events", "cohorts", "normalizers")}
            if data.get("sha256") != _checksum(payload) or payload["format"] != FORMAT:
                raise ValueError("checksum or format mismatch")
            book = Book(self.path, payload["ledger_id"], payload["events"], payload["cohorts"],
                        payload["normalizers"], payload["created"])
            for event in book.events:
                if event["kind"] not in KINDS or event["cohort"] not in book.cohorts:
                    raise ValueError("an event refers to an unknown kind or cohort")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerUnavailable(
                f"privacy ledger {self.path} is corrupt ({err}); the device will not train, because reading it "
                "as 'nothing spent' would forget spent privacy. Restore the file from a backup, or keep it for "
                "inspection and retire this data.") from None
        if known is not None and known != book.ledger_id:
            raise LedgerUnavailable(f"privacy ledger {self.path} is ledger {book.ledger_id}, but {self.folder / INDEX} "
                                    f"records ledger {known} here: it was replaced. Restore the original file.")
        if known is None:
            self._remember(book.ledger_id)
        return book

    def _index(self) -> dict[str, str]:
        path = self.folder / INDEX
        if not path.exists():
            return {}
        try:
            return dict(json.loads(path.read_text())["ledgers"])
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerUnavailable(f"ledger index {path} is corrupt ({err}); restore it from a backup") from None

    def _remember(self, ledger_id: str) -> None:
        with _locked(self.folder / f"{INDEX}.lock", f"ledger index {self.folder / INDEX}", self.lock_wait_s):
            index = self._index()
            index[self.name] = ledger_id
            write_atomically(self.folder / INDEX, json.dumps({"ledgers": index}, indent=1, sort_keys=True) + "\n")


def spend_round(book: Book, data, norm, budget: float, delta: float, mechanism: str, planned: list[Entry],
                train: Callable, run: str, round_: int | None, local: list[Entry] | None = None) -> dict:
    """One DP-SGD round of the device holding ``data`` (its features ``x`` and utterance ``ids``) under the open
    ``book``: decline if it would take any utterance past ``budget``; release the normaliser ``norm`` if this
    data has no release yet (recorded before use); ``train(x)`` on the standardised features, returning the
    accountant entries it spent; record them (and ``local``, a distributed round's entries against a view of
    this device's own share) before returning. Returns the metrics (``declined`` 1: nothing was spent and nothing
    trained)."""
    import torch

    from fl_ser.privacy.normalization import Statistics

    ids = data.ids
    stats = book.released_statistics(norm.key, ids) if norm.spends_privacy else None
    pending = [norm.mechanism()] if norm.spends_privacy and stats is None else []
    before = book.epsilon(ids, delta, mechanism)
    after = book.epsilon(ids, delta, mechanism, planned=[*pending, *planned])
    if after > budget:
        log.warning("declining round %s: its lifetime epsilon would rise from %.3f to %.3f, over its budget %.3f",
                    round_, before, after, budget)
        return {"declined": 1, **book.epsilons(ids, delta, mechanism, run)}
    if pending:
        stats = norm.release(data.x).to_json()
        book.record("normalization", pending, ids, run, round_, statistics=(norm.key, stats))
    with torch.no_grad():
        x = norm.module(data.x, Statistics.from_json(stats) if stats is not None else None)(data.x)
    book.record("training", train(x), ids, run, round_, local=local)  # write-ahead: durable before it leaves
    metrics = {"declined": 0, **book.epsilons(ids, delta, mechanism, run)}
    log.info("round %s: lifetime epsilon %.3f (this run %.3f; normalisation %.3f, training %.3f; against a view of "
             "its own update %.3f) at delta %g",
             round_, *(metrics[k] for k in EPSILON_METRICS), delta)
    return metrics
