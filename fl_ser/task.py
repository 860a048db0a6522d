"""The task, built from one resolved config: on-device features and the classifier.

Both apps call these functions with the same config, so simulation and the
Deployment Engine build exactly the same experiment (the corpus and the
speaker split come from :func:`fl_ser.data.corpus.corpus_from_config` and
:func:`fl_ser.data.partition.split_from_config`, which need no torch).
Features are extracted on the device that owns the audio and cached on that
device's disk (``cache_dir``), keyed by everything they depend on: the corpus
config (audio policy included), the feature settings, the speaker, the label
set, a hash of the feature and data code, and each of the speaker's files'
size and modification time. A cache file holds only tensors, strings and
numbers, loaded with ``torch.load(weights_only=True)`` (no pickled objects); a
damaged one is rebuilt with a warning, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fl_ser.data.corpus import Corpus, LoadReport, corpus_from_config
from fl_ser.models.classifiers import build_classifier
from fl_ser.models.pipeline import EmotionPipeline
from fl_ser.privacy.ledger import utterance_id

log = logging.getLogger(__name__)
#: Part of every feature cache key: bump it when what a cache file holds changes (v3: no pickled objects).
CACHE_VERSION = 3
#: The packages whose code decides what a cached feature file holds: the audio reader and corpora, the extractors.
FEATURE_CODE = ("data", "features")


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def feature_code_version() -> str:
    """A hash of the source of :data:`FEATURE_CODE`: changing an extractor or the audio reader misses the cache."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for package in FEATURE_CODE for p in (root / package).glob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def extractor_from_config(cfg: DictConfig) -> nn.Module:
    return instantiate(cfg.features).eval()


@dataclass
class SpeakerData:
    """One speaker's features and labels, as held by its device (or by the server for a test speaker)."""

    speaker: str
    sex: str | None
    x: torch.Tensor  # (N, *feature_shape), un-normalised
    y: torch.Tensor  # (N,) class indices
    report: LoadReport
    ids: tuple[str, ...]  # each utterance's identity in the privacy ledger (SHA-256 of its decoded audio)


@torch.no_grad()
def extract(extractor: nn.Module, waves: list[np.ndarray]) -> torch.Tensor:
    """Run the extractor over variable-length waveforms, one utterance at a time, on one thread (an utterance is
    too small to share between threads, and on a busy 2-core machine threads made it 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([extractor(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))[None])[0]
                            for w in waves])
    finally:
        torch.set_num_threads(threads)


def speaker_data(cfg: DictConfig, speaker: str, corpus: Corpus | None = None,
                 cache_dir: str | None = None) -> SpeakerData:
    """Load (from the local cache when possible) one speaker's features: the on-device data path.

    ``corpus`` is the experiment's corpus unless the device brings its own (a participant folder);
    ``cache_dir`` defaults to the experiment's ``cache_dir``.
    """
    if corpus is None:
        corpus, source = corpus_from_config(cfg), _plain(cfg.data)
    else:  # a device's own folder: its place and its label list identify the cached features
        source = {"corpus": type(corpus).__name__, "where": corpus.where,
                  "labels": [(u.uid, u.emotion) for u in corpus.utterances_of(speaker)]}
    key = _key(CACHE_VERSION, feature_code_version(), source, _plain(cfg.features), speaker, cfg.get("labels"),
               corpus.fingerprint(speaker))
    cache = Path(cache_dir or cfg.cache_dir) / "features" / f"{key}.pt"
    cached = _read_cache(cache, speaker)
    if cached is not None:
        return cached
    utts, waves, report = corpus.load_speaker(speaker)
    x = extract(extractor_from_config(cfg), waves) if waves else torch.empty(0, 0)
    finite = torch.isfinite(x).flatten(1).all(1).tolist()
    if not all(finite):  # the audio checks should prevent it; no NaN reaches a model regardless
        keep = [i for i, ok in enumerate(finite) if ok]
        for i in sorted(set(range(len(utts))) - set(keep)):
            report.skip("non-finite features", utts[i].uid)
        utts, waves, x = [utts[i] for i in keep], [waves[i] for i in keep], x[keep]
        report.loaded = len(utts)
        log.warning("speaker %s: %s", speaker, report.summary())
    if not utts:
        raise ValueError(f"speaker {speaker}: no usable audio ({report.summary()})")
    y = torch.tensor([label_index(cfg, corpus, u) for u in utts], dtype=torch.long)
    ids = tuple(utterance_id(np.ascontiguousarray(w, dtype=np.float32).tobytes()) for w in waves)
    data = SpeakerData(speaker, corpus.speaker_sex(speaker), x, y, report, ids)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"sex": data.sex, "x": x, "y": y, "report": report.to_dict(), "ids": list(ids)}, tmp)
    tmp.replace(cache)  # atomic: concurrent devices never read a half-written file
    return data


def _read_cache(path: Path, speaker: str) -> SpeakerData | None:
    """The features cached at ``path``, or None when there are none or they cannot be trusted (then rebuilt)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)  # tensors, strings and numbers only: no code runs
        data = SpeakerData(speaker, blob["sex"], blob["x"], blob["y"], LoadReport(**blob["report"]),
                           tuple(blob["ids"]))
        if not (data.x.is_floating_point() and data.y.dtype == torch.long
                and len(data.x) == len(data.y) == len(data.ids) > 0 and bool(torch.isfinite(data.x).all())):
            raise ValueError("its contents are inconsistent")
    except Exception as err:  # whatever is wrong with a cache file, its features are rebuilt, never trusted
        log.warning("feature cache %s is damaged (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None
    return data


def label_index(cfg: DictConfig, corpus: Corpus, utt) -> int:
    """Class index of an utterance in the experiment's label list (a device may hold only some emotions)."""
    labels = cfg.get("labels")
    if not labels:
        return corpus.label_of(utt)
    if utt.emotion not in labels:
        raise ValueError(f"{utt.uid}: emotion {utt.emotion!r} is not one of this experiment's labels {list(labels)}; "
                         "remove it from labels.csv (check with `python -m clients.validate DATA_DIR --labels ...`)")
    return list(labels).index(utt.emotion)


def new_classifier(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The classifier every party starts from: same seed, same initial weights."""
    ext = extractor_from_config(cfg)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(int(cfg.seed))
        return build_classifier(cfg.model, ext.output_shape, ext.kind, num_classes)


def get_arrays(classifier: nn.Module) -> list[np.ndarray]:
    """The federated state: the classifier's trainable parameters, in a fixed order. Nothing else."""
    return [p.detach().cpu().numpy().copy() for p in classifier.parameters()]


def set_arrays(classifier: nn.Module, arrays: list[np.ndarray]) -> None:
    params = list(classifier.parameters())
    if len(params) != len(arrays):
        raise ValueError(f"model has {len(params)} parameter tensors but {len(arrays)} arrays were received; "
                         "the device and server configs (model, features, emotions) must match")
    with torch.no_grad():
        for p, a in zip(params, arrays, strict=True):
            if tuple(p.shape) != tuple(a.shape):
                raise ValueError(f"parameter shape mismatch {tuple(p.shape)} vs {tuple(a.shape)}: "
                                 "device and server configs differ")
            p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))


def pipeline(cfg: DictConfig, classifier: nn.Module, normalizer: nn.Module, labels: list[str]) -> EmotionPipeline:
    return EmotionPipeline(extractor_from_config(cfg), normalizer, classifier, labels)
