"""Speaker-independent partitions: one device per training speaker, held-out test speakers.

Test speakers never train (the SER standard for speaker-independent
evaluation). Splits are deterministic from a seed and balanced by sex where the
corpus gives it, so per-sex UAR is measurable on the held-out side.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fl_ser.data.corpus import CorpusError


@dataclass(frozen=True)
class SpeakerSplit:
    train: tuple[str, ...]  # device i holds speaker train[i]
    test: tuple[str, ...]  # evaluated by the server, never trained on

    def __post_init__(self):
        overlap = set(self.train) & set(self.test)
        if overlap:
            raise CorpusError(f"speakers {sorted(overlap)} are both training devices and held-out test speakers")


def _sex_interleaved(speakers: list[str], sex_of: Callable[[str], str | None], seed: int) -> list[str]:
    """Shuffle, then interleave the sexes so any prefix is as balanced as possible."""
    rng = random.Random(seed)
    groups: dict[str | None, list[str]] = {}
    for s in sorted(speakers):
        groups.setdefault(sex_of(s), []).append(s)
    for members in groups.values():
        rng.shuffle(members)
    order = []
    while any(groups.values()):
        for key in sorted(groups, key=str):
            if groups[key]:
                order.append(groups[key].pop())
    return order


def holdout_split(speakers: list[str], num_test: int, seed: int = 0,
                  sex_of: Callable[[str], str | None] = lambda s: None) -> SpeakerSplit:
    """Hold out ``num_test`` speakers (sex-balanced); every other speaker is one device."""
    if not 1 <= num_test < len(speakers) - 1:
        raise CorpusError(
            f"cannot hold out {num_test} of {len(speakers)} speakers: need at least one test speaker and two "
            f"training devices. Set partition.num_test_speakers between 1 and {len(speakers) - 2}."
        )
    order = _sex_interleaved(speakers, sex_of, seed)
    return SpeakerSplit(train=tuple(sorted(order[num_test:])), test=tuple(sorted(order[:num_test])))


def kfold_splits(speakers: list[str], num_folds: int, seed: int = 0,
                 sex_of: Callable[[str], str | None] = lambda s: None) -> list[SpeakerSplit]:
    """Speaker k-fold: each speaker is held out in exactly one fold."""
    if not 2 <= num_folds <= len(speakers):
        raise CorpusError(f"num_folds must be between 2 and {len(speakers)} (the number of speakers), got {num_folds}")
    order = _sex_interleaved(speakers, sex_of, seed)
    folds = [order[i::num_folds] for i in range(num_folds)]
    return [SpeakerSplit(train=tuple(sorted(set(order) - set(f))), test=tuple(sorted(f))) for f in folds]


def split_from_config(cfg, corpus) -> SpeakerSplit:
    """The experiment's speaker split: ``partition.num_folds``/``fold``, or ``num_test_speakers`` held out."""
    part = cfg.partition
    speakers = corpus.speakers
    if part.get("num_folds"):
        folds = kfold_splits(speakers, int(part.num_folds), seed=int(part.seed), sex_of=corpus.speaker_sex)
        if not 0 <= int(part.fold) < len(folds):
            raise ValueError(f"partition.fold={part.fold} is out of range for {len(folds)} folds")
        return folds[int(part.fold)]
    return holdout_split(speakers, int(part.num_test_speakers), seed=int(part.seed), sex_of=corpus.speaker_sex)
