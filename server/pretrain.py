"""Public pre-training: the server trains the initial global model centrally on a public corpus (``pretrain=...``).

Without it every federation starts from the seeded fresh classifier, and DP-SGD
on each device's few utterances has to learn everything from there. With
``pretrain=synthetic`` (the built-in synthetic corpus, from a fixed public seed
that no experiment's speakers use) or ``pretrain=emodb pretrain.corpus.root=DIR``
(for a federation that runs on other speech), the server first trains the
classifier on that corpus, non-privately, with plain SGD
(:func:`fl_ser.training.train_local`), and round 1 starts from the result; the
federation then fine-tunes it with DP exactly as before.

Why it costs no privacy: the public corpus is not the devices' data, so no
device's utterance influences the pre-trained model, and the initial global
model is public by construction (every device receives it in round 1 anyway).
DP-SGD's and the user-level guarantees are about what the *devices'* data
changes; a data-independent starting point (the seeded fresh classifier, or this
one) is not part of what they bound. The one way to break this is to pre-train
on the private corpus itself, so :func:`check` refuses a pre-training corpus that
is the experiment's own (same ``_target_`` and the same seed, root or manifest)
or that shares any audio file with it, before any process starts
(``experiments.train.prepare``). With real devices that bring their own folders
(the Deployment Engine) the server cannot see their files: pre-train only on a
corpus the participants did not record.

The public corpus is processed as this experiment's devices process their own
data: the experiment's feature extractor (features cached in ``cache_dir`` like a
device's, :func:`fl_ser.task.speaker_data`), and each public speaker
standardised exactly as a device of this experiment standardises itself and as
the server's evaluation standardises a held-out speaker
(:meth:`fl_ser.privacy.normalization.Normalization.standardise`: the public
reference statistics for ``public``, a Gaussian release of the speaker's own
statistics for ``dp``, the speaker's own statistics for ``local``, each
utterance's own for ``utterance``; with ``bound`` the same clamp). Public data,
so the ``dp`` release is recorded in no ledger.

Labels are matched by name, in the experiment's order (class ``i`` is
``labels[i]``): public utterances of an emotion the experiment does not have are
left out; experiment classes that the public corpus lacks are never a target
during pre-training, and afterwards their rows of the output layer (weight and
bias) are reset to the fresh classifier's (the layers below them stay
pre-trained). No emotion in common is refused.

The arrays are cached in ``cache_dir/pretrained/`` (an ``.npz`` of plain arrays
and a JSON record, loaded with ``allow_pickle=False``, written atomically),
keyed by everything they depend on: the pre-training config, the features, the
model, the normalisation, the labels, the seed, the feature code and the public
corpus's files; so each fold of a cross-validation pre-trains once. A damaged
cache file is rebuilt, never trusted. A resumed run never pre-trains again: its
parameters come from its checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fl_ser.server")
#: Part of the cache key: bump it when what a cached pre-training holds or how it is made changes.
CACHE_VERSION = 1
#: Keys that say where a corpus's data comes from: two corpora of one loader that agree on one are the same data.
IDENTITY_KEYS = ("seed", "root", "manifest")


class PretrainError(ValueError):
    """The pre-training config cannot be used as written; the message names the setting and the fix."""


def enabled(cfg: DictConfig) -> bool:
    """Whether the experiment pre-trains (``pretrain=none``, or a config from before pre-training existed: no)."""
    pre = cfg.get("pretrain")
    return pre is not None and pre.get("corpus") is not None


def public_corpus(cfg: DictConfig):
    """The pre-training corpus as configured (instantiated like ``cfg.data``)."""
    from fl_ser.data.corpus import corpus_from_config

    return corpus_from_config(OmegaConf.create({"data": _plain(cfg.pretrain.corpus)}))


def matched_labels(cfg: DictConfig, corpus) -> tuple[list[str], list[str], list[str]]:
    """(experiment classes the corpus has, in the experiment's order; classes it lacks; its emotions left out)."""
    labels = list(cfg.labels)
    have = set(corpus.emotions)
    return ([e for e in labels if e in have], [e for e in labels if e not in have],
            [e for e in corpus.emotions if e not in labels])


def check(cfg: DictConfig, corpus) -> None:
    """Refuse pre-training that would not be public or cannot train (``corpus``: the experiment's own; raises
    :class:`PretrainError` naming the fix)."""
    if not enabled(cfg):
        return
    pre = cfg.pretrain
    for key, low in (("epochs", 1), ("batch_size", 1)):
        if pre.get(key) is not None and int(pre[key]) < low:
            raise PretrainError(f"pretrain.{key}={pre[key]} must be >= {low}")
    if not float(pre.lr) > 0:
        raise PretrainError(f"pretrain.lr={pre.lr} must be positive")
    private, public = _plain(cfg.data), _plain(pre.corpus)
    fix = ("pre-training must use a corpus the devices' data is not part of: pretrain=synthetic (its public seed), "
           "pretrain=emodb pretrain.corpus.root=DIR for a federation on other speech, or pretrain=none")
    if private.get("_target_") == public.get("_target_"):
        same = [k for k in IDENTITY_KEYS if private.get(k) is not None and _same(private[k], public.get(k))]
        if same:
            raise PretrainError(f"pretrain.corpus is the experiment's own corpus (same {public['_target_']} and "
                                f"{', '.join(f'{k}={public[k]}' for k in same)}): pre-training on the devices' data "
                                f"would not be at no privacy cost. Fix: {fix}.")
    other = public_corpus(cfg)
    shared = sorted({_where(u.source) for u in corpus.utterances} & {_where(u.source) for u in other.utterances})
    if shared:
        raise PretrainError(f"pretrain.corpus shares {len(shared)} recordings with the experiment's corpus (e.g. "
                            f"{shared[0]}): pre-training on the devices' data would not be at no privacy cost. "
                            f"Fix: {fix}.")
    if not matched_labels(cfg, other)[0]:
        raise PretrainError(f"pretrain.corpus has the emotions {list(other.emotions)}, none of this "
                            f"experiment's labels {list(cfg.labels)}: there is nothing to pre-train. Pick a corpus "
                            "with some of these emotions, or pretrain=none.")


def pretrained_arrays(cfg: DictConfig) -> tuple[list[np.ndarray], dict] | None:
    """The pre-trained initial global model's arrays (:func:`fl_ser.task.get_arrays` order) and its record for
    ``summary.json``, from the cache when it holds them; None with ``pretrain=none``."""
    from fl_ser.task import get_arrays, new_classifier

    if not enabled(cfg):
        return None
    t0 = time.monotonic()
    fresh = new_classifier(cfg, len(cfg.labels))
    corpus = public_corpus(cfg)
    matched, missing, left_out = matched_labels(cfg, corpus)
    if not matched:
        raise PretrainError(f"pretrain.corpus has none of the labels {list(cfg.labels)}")  # check() says more
    path = Path(cfg.cache_dir) / "pretrained" / f"{cache_key(cfg, corpus)}.npz"
    cached = _read(path, [a.shape for a in get_arrays(fresh)])
    if cached is not None:
        arrays, record = cached
        record.update(cache_hit=True, seconds=round(time.monotonic() - t0, 2))
        log.info("pre-trained initial model from the cache (%s, training-set UAR %.3f): %s", record["corpus"],
                 record["train_uar"], path)
        return arrays, record
    log.info("pre-training the initial model on %r (classes %s; missing %s; left out %s), %d epochs ...",
             corpus, matched, missing, left_out, int(cfg.pretrain.epochs))
    classifier, record = _train(cfg, matched, fresh)
    arrays = get_arrays(classifier)
    record.update(corpus=repr(corpus), classes_matched=matched, classes_missing=missing,
                  emotions_left_out=left_out, train_seconds=round(time.monotonic() - t0, 2))
    _write(path, arrays, record)
    record.update(cache_hit=False, seconds=record["train_seconds"])
    log.info("pre-trained in %.1f s on %d utterances of %d public speakers: training-set UAR %.3f (cached in %s)",
             record["seconds"], record["num_utterances"], record["num_speakers"], record["train_uar"], path)
    return arrays, record


def resumed_record(cfg: DictConfig) -> dict | None:
    """What a resumed run records about its pre-training (done at its first start; its parameters come from the
    checkpoint): the cached record when the cache still holds it, without training again."""
    if not enabled(cfg):
        return None
    path = Path(cfg.cache_dir) / "pretrained" / f"{cache_key(cfg, public_corpus(cfg))}.npz"
    record = {"name": str(cfg.pretrain.name)}
    try:
        with np.load(path, allow_pickle=False) as blob:
            record = json.loads(str(blob["record"]))
    except Exception:  # no cache (or a damaged one): the run's first start logged what it pre-trained
        pass
    return {**record, "resumed": True}


def cache_key(cfg: DictConfig, corpus) -> str:
    """Everything the pre-trained arrays depend on (the public corpus's files included)."""
    from fl_ser.privacy import normalization
    from fl_ser.task import feature_code_version

    parts = [CACHE_VERSION, feature_code_version(), _plain(cfg.pretrain), _plain(cfg.features), _plain(cfg.model),
             _plain(cfg.privacy.normalization), normalization.from_config(cfg).key, list(cfg.labels), int(cfg.seed),
             [corpus.fingerprint(s) for s in corpus.speakers]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train(cfg: DictConfig, matched: list[str], fresh):
    """Pre-train a copy of ``fresh`` on the public corpus's utterances of the ``matched`` classes."""
    import copy

    import torch

    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.metrics import classification_report
    from fl_ser.privacy import normalization
    from fl_ser.task import speaker_data
    from fl_ser.training import LocalTrainConfig, evaluate, train_local

    # The experiment's features and cache, with the public corpus (only the matched classes) as its data.
    public = OmegaConf.create({**_plain(cfg), "data": {**_plain(cfg.pretrain.corpus), "emotions": matched},
                               "labels": matched})
    norm = normalization.from_config(cfg)
    to_experiment = torch.tensor([list(cfg.labels).index(e) for e in matched])
    xs, ys = [], []
    speakers = corpus_from_config(public).speakers  # those with an utterance of a matched class
    for speaker in speakers:
        data = speaker_data(public, speaker)
        xs.append(norm.standardise(data.x))  # as this experiment's device would (dp: a release in no ledger)
        ys.append(to_experiment[data.y])
    x, y = torch.cat(xs), torch.cat(ys)
    pre = cfg.pretrain
    classifier = copy.deepcopy(fresh)
    train_local(classifier, x, y, LocalTrainConfig(
        epochs=int(pre.epochs), batch_size=None if pre.get("batch_size") is None else int(pre.batch_size),
        lr=float(pre.lr), momentum=float(pre.get("momentum") or 0.0),
        weight_decay=float(pre.get("weight_decay") or 0.0)))
    missing = [i for i, e in enumerate(cfg.labels) if e not in matched]
    if missing:
        _reset_rows(classifier, fresh, missing, len(cfg.labels))
    pred, loss = evaluate(classifier, x, y)
    report = classification_report(y.numpy(), pred.numpy(), list(cfg.labels))
    record = {"name": str(pre.name), "num_speakers": len(speakers), "num_utterances": len(y),
              "epochs": int(pre.epochs), "lr": float(pre.lr), "batch_size": pre.get("batch_size"),
              "normalization": norm.mode, "train_uar": report["uar"], "train_accuracy": report["accuracy"],
              "train_loss": loss}
    return classifier, record


def _reset_rows(classifier, fresh, rows: list[int], num_classes: int) -> None:
    """Give the output layer's ``rows`` (weight and bias) back their fresh values: classes never pre-trained."""
    import torch
    from torch import nn

    def output_layer(module):
        linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linear or linear[-1].out_features != num_classes:
            raise PretrainError(f"{type(module).__name__}: its last linear layer is not the {num_classes}-class "
                                "output layer, so classes the public corpus lacks cannot keep their fresh rows")
        return linear[-1]

    out, out_fresh = output_layer(classifier), output_layer(fresh)
    with torch.no_grad():
        out.weight[rows] = out_fresh.weight[rows]
        if out.bias is not None:
            out.bias[rows] = out_fresh.bias[rows]


def _write(path: Path, arrays: list[np.ndarray], record: dict) -> None:
    from fl_ser.durable import write_atomically

    buffer = io.BytesIO()
    np.savez(buffer, record=np.array(json.dumps(record)), **{f"p{i}": a for i, a in enumerate(arrays)})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())  # folds or runs that pre-train at once never read half a file


def _read(path: Path, shapes: list[tuple[int, ...]]) -> tuple[list[np.ndarray], dict] | None:
    """The cached arrays and record, or None when there are none or they do not fit the model (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as blob:  # plain arrays and one string: no code runs
            arrays = [blob[f"p{i}"] for i in range(len(shapes))]
            record = json.loads(str(blob["record"]))
        if [a.shape for a in arrays] != [tuple(s) for s in shapes] or not all(
                a.dtype == np.float32 and np.isfinite(a).all() for a in arrays):
            raise ValueError("its arrays do not fit the model")
    except Exception as err:  # whatever is wrong with a cache file, it is rebuilt, never trusted
        log.warning("pre-training cache %s is damaged (%s: %s); pre-training again", path, type(err).__name__, err)
        return None
    return arrays, record


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _same(a, b) -> bool:
    """Equal config values; paths compared after resolving (``~``, relative paths, links)."""
    if isinstance(a, str) and isinstance(b, str):
        return _where(a) == _where(b)
    return a == b


def _where(source: str) -> str:
    """A recording's identity: the real path of a file, or the description of generated audio."""
    return os.path.realpath(os.path.expanduser(source)) if os.path.exists(os.path.expanduser(source)) else source
