"""The corpus contract every data source fulfils, and the canonical emotion names.

A corpus is a list of utterance *descriptions* (cheap metadata: id, speaker,
emotion, sex, where the audio is) plus a way to load one speaker's audio. Only
the device that owns a speaker ever calls :meth:`Corpus.load_speaker` for it;
the server never touches device audio. Audio comes back as float32 mono at
:data:`SAMPLE_RATE` (16 kHz), whatever the source's rate and channel count.
"""

from __future__ import annotations

import abc
import functools
import json
import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000

#: Canonical emotion names used across corpora (loaders map their codes to these).
EMOTIONS = (
    "anger",
    "boredom",
    "disgust",
    "fear",
    "happiness",
    "sadness",
    "neutral",
    "calm",
    "surprise",
)


class CorpusError(ValueError):
    """A corpus cannot be used as configured (wrong path, empty, unknown labels)."""


@dataclass(frozen=True)
class Utterance:
    """One labelled recording, described but not loaded."""

    uid: str
    speaker: str
    emotion: str
    sex: str | None = None  # "f", "m" or None when the corpus does not say
    source: str = ""  # file path, or a description for generated audio


@dataclass
class LoadReport:
    """What happened while loading audio: which files were skipped and why, and what was noted about kept ones.

    Reasons and notes are those of :mod:`fl_ser.data.audio` (``REASONS``, ``NOTES``); it is plain data
    (:meth:`to_dict`), so a feature cache can keep it without pickle.
    """

    loaded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    noted: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, uid: str) -> None:
        self.skipped.setdefault(reason, []).append(uid)

    def note(self, note: str, uid: str) -> None:
        self.noted.setdefault(note, []).append(uid)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "skipped": self.skipped, "noted": self.noted}

    def summary(self) -> str:
        def listing(uids_by_reason: dict[str, list[str]]) -> str:
            return ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(uids_by_reason.items()))

        text = f"{self.loaded} utterances loaded"
        if self.num_skipped:
            text += f", {self.num_skipped} skipped: {listing(self.skipped)}"
        if self.noted:
            text += f"; noted: {listing(self.noted)}"
        return text


class Corpus(abc.ABC):
    """A labelled emotional-speech corpus, one or more utterances per speaker.

    Subclasses fill :attr:`utterances` (metadata only) in ``__init__`` and
    implement :meth:`_load_audio`. ``emotions`` restricts and orders the label
    set: class index ``i`` is ``self.emotions[i]``.
    """

    name: str = "corpus"
    #: Whether requesting an emotion the data lacks is an error (a corpus) or merely logged (one participant).
    requires_every_emotion: bool = True
    emotions: tuple[str, ...]
    utterances: list[Utterance]  # set by _finalise (file corpora) or built lazily

    def __init__(self, emotions: list[str] | tuple[str, ...] | None = None):
        self._requested_emotions = tuple(emotions) if emotions else None

    # -- metadata ---------------------------------------------------------
    def _finalise(self, utterances: list[Utterance], where: str) -> None:
        """Keep utterances of the requested emotions; fail clearly if nothing is left."""
        if not utterances:
            raise CorpusError(f"{self.name}: no utterances found in {where}. Check the path and layout.")
        unknown = {u.emotion for u in utterances} - set(EMOTIONS)
        if unknown:
            raise CorpusError(f"{self.name}: unknown emotion labels {sorted(unknown)} in {where}; known: {EMOTIONS}")
        present = {u.emotion for u in utterances}
        if self._requested_emotions:
            missing = [e for e in self._requested_emotions if e not in present]
            if missing and self.requires_every_emotion:
                raise CorpusError(
                    f"{self.name}: emotions {missing} were requested but {where} has none; it has {sorted(present)}"
                )
            if missing:
                log.info("%s: %s has no utterances of %s", self.name, where, missing)
            self.emotions = self._requested_emotions
        else:
            self.emotions = tuple(e for e in EMOTIONS if e in present)
        self.utterances = sorted((u for u in utterances if u.emotion in self.emotions), key=lambda u: u.uid)
        self.where = where

    @property
    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def speaker_sex(self, speaker: str) -> str | None:
        for u in self.utterances:
            if u.speaker == speaker:
                return u.sex
        raise KeyError(speaker)

    def utterances_of(self, speaker: str) -> list[Utterance]:
        return [u for u in self.utterances if u.speaker == speaker]

    def label_of(self, utt: Utterance) -> int:
        return self.emotions.index(utt.emotion)

    # -- audio (device side only) ------------------------------------------
    @abc.abstractmethod
    def _load_audio(self, utt: Utterance) -> np.ndarray:
        """Return float32 mono audio at SAMPLE_RATE, or raise AudioError."""

    def _load_noted(self, utt: Utterance) -> tuple[np.ndarray, tuple[str, ...]]:
        """The utterance's audio and what was noted reading it (``fl_ser.data.audio.NOTES``); generated audio has
        no notes."""
        return self._load_audio(utt), ()

    def fingerprint(self, speaker: str) -> dict:
        """What one speaker's audio depends on beyond the corpus config and the code (a feature cache key part):
        nothing for generated audio; file corpora add each file's size and modification time."""
        return {}

    def load_speaker(self, speaker: str) -> tuple[list[Utterance], list[np.ndarray], LoadReport]:
        """Load every usable utterance of one speaker; bad files are skipped and counted, notes counted."""
        from fl_ser.data.audio import AudioError

        report = LoadReport()
        kept, waves = [], []
        for utt in self.utterances_of(speaker):
            try:
                wave, notes = self._load_noted(utt)
            except AudioError as err:
                report.skip(err.reason, utt.uid)
                continue
            for note in notes:
                report.note(note, utt.uid)
            kept.append(utt)
            waves.append(wave)
        report.loaded = len(kept)
        if report.num_skipped or report.noted:
            log.warning("%s speaker %s: %s", self.name, speaker, report.summary())
        return kept, waves, report


@functools.lru_cache(maxsize=4)
def _corpus(data_json: str) -> Corpus:
    from hydra.utils import instantiate

    return instantiate(json.loads(data_json))


def corpus_from_config(cfg) -> Corpus:
    """The corpus an experiment config's ``data`` section names (instantiated once per process; light: no torch)."""
    from omegaconf import OmegaConf

    return _corpus(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True))
