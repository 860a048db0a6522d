"""Personalise the stored global model to this device's speaker, on the device, and measure the gain on held-out data.

    python -m clients.personalise --store STORE_DIR DATA_DIR [--holdout 0.3] [--epochs E] [--lr LR]
                                  [--seed S] [--json]

The model personalised is the store's latest *global* version (one without ``personalised_from``).

1. The participant's labelled recordings (DATA_DIR, see ``clients.validate``) of the model's
   emotions are split per emotion into an adaptation part and a held-out part (``--holdout``
   of each emotion's utterances, at least one on each side for an emotion with two or more).
2. The normaliser's mean/std are refitted on the adaptation part's features (unlabelled
   statistics, as :meth:`~fl_ser.features.normalize.FeatureNormalizer.fit`; training on the
   devices standardises the same way, so this alone usually helps).
3. Only the classifier's last Linear layer (the head) is fine-tuned on the adaptation part:
   full-batch Adam on class-balanced cross-entropy, starting from the global head. The
   defaults (50 steps, learning rate 0.01) were chosen on EmoDB (10 speakers, each
   personalising a model trained on 8 others, 5 splits each): held-out UAR 0.62 (global),
   0.74 (device normaliser), 0.76 (personalised head); 200 steps overfit (0.74). On the
   synthetic corpus the head adds nothing measurable beyond the normaliser.
4. The held-out part scores three models: the global one as stored, with the device's
   normaliser, and personalised (normaliser and head). The personalised model is saved as a
   new store version whose meta records ``personalised_from``, the scores, the gains over the
   global model and the split sizes. It is saved even when the gain is negative (the meta says
   so); the held-out part is small, so the gain is a noisy estimate.

The model is rebuilt as the eager ``EmotionPipeline`` it was released from (``extractor``,
``normalizer`` with buffers ``mean``/``std``, ``classifier``): the version's ``config.yaml`` gives
the modules, its TorchScript file their weights (:func:`eager_model`). The head's inputs are computed
once (:func:`head_inputs`), the head is trained as a plain tensor pair and copied back with ``copy_``,
as are the normaliser's buffers; the new version is exported and checked in every release format by
:mod:`fl_ser.models.export`, like a release. Versions stored before releases carried ``config.yaml``
load and predict, but cannot be personalised. Nothing leaves the device; the split's seed is the only
randomness.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.cli import EXIT_OK, fail, table, to_json
from clients.model_store import ARTIFACT, ModelStore, StoredModel, StoreError
from fl_ser.data.corpus import CorpusError
from fl_ser.data.loaders import DeviceFolder
from fl_ser.features.normalize import FeatureNormalizer, UtteranceNormalizer
from fl_ser.metrics import classification_report
from fl_ser.models.export import export_formats
from fl_ser.models.pipeline import EmotionPipeline
from fl_ser.models.runtimes import load_torchscript
from fl_ser.protocol import RELEASE_CONFIG_FILE, RELEASE_TARGETS
from fl_ser.task import extract

#: meta.json keys a personalised version takes over from the model it started from (where it came from).
INHERITED = ("round", "config_hash", "run_id", "speaker")
#: Defaults: the held-out fraction; Adam steps and learning rate for the head (chosen on EmoDB, see above).
HOLDOUT, EPOCHS, LR = 0.3, 50, 0.01
#: The three models scored on the held-out part, in order.
VARIANTS = {"global": "global (as stored)", "device_normaliser": "+ device normaliser", "personalised": "+ head"}


def check_settings(holdout: float, epochs: int, lr: float) -> None:
    if not 0 < holdout < 1 or epochs < 1 or lr <= 0:
        raise ValueError(
            f"holdout must be a fraction between 0 and 1, epochs at least 1 and lr positive; "
            f"got holdout={holdout}, epochs={epochs}, lr={lr}"
        )


def stratified_split(y: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (adaptation, held out): a ``holdout`` fraction of each class held out, at least one per side
    of a class with two or more members."""
    rng = np.random.default_rng(seed)
    adapt, held = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_held = min(max(1, round(holdout * len(members))), len(members) - 1)
        held += members[:n_held].tolist()
        adapt += members[n_held:].tolist()
    if not held:
        raise CorpusError("too few recordings to hold any out: record at least two of an emotion")
    return np.array(sorted(adapt)), np.array(sorted(held))


def _targets(node) -> list[str]:
    """Every Hydra ``_target_`` in a config subtree (instantiate follows nested ones too)."""
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def eager_model(store: ModelStore, version: int) -> tuple[EmotionPipeline, list[str], dict]:
    """The stored version as the eager pipeline it was exported from, its labels and meta (see :func:`rebuild`)."""
    stored = store.get(version)
    if RELEASE_CONFIG_FILE not in stored.digests:
        raise StoreError(
            f"model v{version:04d} in {store.root} holds no {RELEASE_CONFIG_FILE} (it was stored before releases "
            "carried one), so it cannot be rebuilt and exported. Fix: personalise a version received since"
        )
    model = rebuild(store.read(stored, RELEASE_CONFIG_FILE), store.read(stored, ARTIFACT), stored.labels,
                    f"model v{version:04d} in {store.root}")
    return model, stored.labels, stored.meta


def rebuild(config: bytes, artifact: bytes, labels: list[str], source: str) -> EmotionPipeline:
    """The eager pipeline a release was exported from (eval mode, no gradients), from its ``config.yaml`` and
    TorchScript file; ``source`` names them in errors (:class:`StoreError`).

    The modules come from the config (features, model; only fl-ser's own, :data:`~fl_ser.protocol.RELEASE_TARGETS`),
    the normaliser's settings and every weight and buffer from the TorchScript file (``load_state_dict``, strict).
    """
    from omegaconf import OmegaConf

    from fl_ser.task import new_classifier, pipeline

    cfg = OmegaConf.create(config.decode())
    foreign = sorted(set(_targets(OmegaConf.to_container(cfg.features)) + _targets(OmegaConf.to_container(cfg.model)))
                     - RELEASE_TARGETS)
    if foreign:  # the server wrote this config: never let it name what the device runs
        raise StoreError(
            f"{source}: its {RELEASE_CONFIG_FILE} names {foreign}, which is not one of "
            f"fl-ser's feature extractors or classifiers {sorted(RELEASE_TARGETS)}; the device builds nothing else. "
            "Fix: use a release made by fl-ser"
        )
    scripted = load_torchscript(artifact)
    norm = scripted.normalizer
    shape = tuple(int(s) for s in norm.shape)
    normalizer = (UtteranceNormalizer(shape, str(norm.kind), float(norm.min_std))
                  if norm.original_name == "UtteranceNormalizer"
                  else FeatureNormalizer(shape, str(norm.kind), float(norm.min_std), float(norm.bound)))
    model = pipeline(cfg, new_classifier(cfg, len(labels)), normalizer, list(labels))
    state = scripted.state_dict()  # TorchScript's holds the non-persistent buffers too (e.g. DFT bases)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    derived = [name for name in own if name not in model.state_dict()]
    differ = sorted(set(own) ^ set(state)) or [name for name in derived if not torch.equal(own[name], state[name])]
    if differ:
        raise StoreError(
            f"{source} is not the model its {RELEASE_CONFIG_FILE} builds with this "
            f"version of fl-ser (they differ in {differ[:4]}). Fix: use the fl-ser version the release "
            "was made with, or let the device receive a new release"
        )
    model.load_state_dict({name: state[name] for name in model.state_dict()}, strict=True)
    return model.eval().requires_grad_(False)


def classifier_head(classifier: nn.Module) -> nn.Module:
    """The classifier's last Linear layer (eager or scripted)."""
    linears = [m for _, m in classifier.named_modules() if getattr(m, "original_name", type(m).__name__) == "Linear"]
    if not linears:
        raise ValueError("the classifier has no Linear layer, so there is no head to personalise")
    return linears[-1]


@torch.no_grad()
def head_inputs(classifier: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``head`` receives when ``classifier`` runs on ``x``, for a head that is the classifier's last step.

    The head's rows are set to unit vectors, a block of C at a time, so its outputs are C coordinates
    of its input; the head is restored afterwards. Raises ValueError if the head is not the last step.
    """
    weight, bias = head.weight.clone(), head.bias.clone()
    num_out, num_in = weight.shape
    identity = torch.eye(num_in)
    blocks = []
    try:
        head.bias.zero_()
        for start in range(0, num_in, num_out):
            unit = identity[start : start + num_out]
            head.weight.zero_()
            head.weight[: len(unit)].copy_(unit)
            blocks.append(classifier(x)[:, : len(unit)])
    finally:
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    inputs = torch.cat(blocks, dim=1)
    if not torch.allclose(F.linear(inputs, weight, bias), classifier(x), rtol=1e-4, atol=1e-4):
        raise ValueError("the classifier's last Linear layer is not its last step, so it cannot be personalised alone")
    return inputs


@torch.no_grad()
def refit_normalizer(normalizer: nn.Module, x: torch.Tensor) -> None:
    """Set the normaliser's mean/std to those of ``x``, exactly as FeatureNormalizer.fit computes them."""
    fitted = FeatureNormalizer(tuple(x.shape[1:]), str(normalizer.kind), float(normalizer.min_std)).fit(x)
    normalizer.mean.copy_(fitted.mean)
    normalizer.std.copy_(fitted.std)


def finetune_head(head: nn.Module, inputs: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> float:
    """Train the head (in place) on its inputs with full-batch Adam on class-balanced cross-entropy; final loss."""
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    counts = torch.bincount(y, minlength=weight.shape[0]).float()
    present = counts > 0
    balance = torch.zeros_like(counts)  # n / (classes present x n_class): each class present weighs the same
    balance[present] = counts.sum() / (present.sum() * counts[present])
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        loss = F.cross_entropy(F.linear(inputs, weight, bias), y, weight=balance)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return loss.item()


@torch.no_grad()
def _score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    pred = model.classifier(model.normalizer(x)).argmax(dim=1)
    report = classification_report(y.numpy(), pred.numpy(), list(labels))
    return {"uar": report["uar"], "accuracy": report["accuracy"]}


def latest_global(store: ModelStore) -> int:
    """The newest version that is not itself personalised (a model as the federation released it)."""
    released = [v for v in store.versions() if "personalised_from" not in store.get(v).meta]
    if not released:
        raise StoreError(
            f"model store {store.root} holds no global model to personalise (only personalised ones, or none). "
            "Fix: let this device take part in a federated run until the server releases its model."
        )
    return released[-1]


def personalise(
    store: ModelStore,
    folder: str | Path,
    holdout: float = HOLDOUT,
    epochs: int = EPOCHS,
    lr: float = LR,
    seed: int = 0,
) -> StoredModel:
    """Personalise the store's latest global model on a participant folder; returns the new version.

    Starting from a global model, never from an earlier personalisation, keeps the held-out part
    honest: another split would hold out recordings that an earlier head was trained on.
    """
    check_settings(holdout, epochs, lr)
    model, labels, source = eager_model(store, latest_global(store))
    corpus = DeviceFolder(folder, emotions=labels)
    utterances, waves, loaded = corpus.load_speaker(corpus.speaker)
    if not utterances:
        raise CorpusError(f"{corpus.root} has no usable recordings of the model's emotions {labels}")
    y = torch.tensor([corpus.label_of(u) for u in utterances])
    x = extract(model.extractor, waves)
    adapt, held = stratified_split(y.numpy(), holdout, seed)

    scores = {"global": _score(model, x[held], y[held], labels)}
    refit_normalizer(model.normalizer, x[adapt])
    scores["device_normaliser"] = _score(model, x[held], y[held], labels)
    head = classifier_head(model.classifier)
    inputs = head_inputs(model.classifier, head, model.normalizer(x[adapt]))
    final_loss = finetune_head(head, inputs, y[adapt], epochs, lr)
    scores["personalised"] = _score(model, x[held], y[held], labels)

    meta: dict[str, Any] = {key: source[key] for key in INHERITED if key in source}
    meta |= {
        "personalised_from": source["version"],
        "uar_gain": scores["personalised"]["uar"] - scores["global"]["uar"],
        "accuracy_gain": scores["personalised"]["accuracy"] - scores["global"]["accuracy"],
        "adaptation_size": len(adapt),
        "holdout_size": len(held),
        "held_out": scores,
        "settings": {"holdout": holdout, "epochs": epochs, "lr": lr, "seed": seed, "final_loss": final_loss},
        "unusable_files": loaded.skipped,
    }
    return save_version(store, model, source["version"], meta)


def save_version(store: ModelStore, model: EmotionPipeline, source: int, meta: dict) -> StoredModel:
    """Export a (modified) pipeline in every release format, checked, and store it as the next version, with the
    config of version ``source`` (the one it was rebuilt from)."""
    config = store.read(store.get(source), RELEASE_CONFIG_FILE)
    with tempfile.TemporaryDirectory(prefix="fl-ser-personalised-") as folder:
        exported = export_formats(model, folder)
        files = {path.name: path.read_bytes() for path in exported.files.values()}
    return store.add(files | {RELEASE_CONFIG_FILE: config}, model.labels, meta)


def adapt_normaliser(store: ModelStore, version: int, features: torch.Tensor) -> StoredModel:
    """Store ``version`` with its normaliser refitted on this device's (unlabelled) features as a new version.

    This is how the device used the global classifier during federated training (its own feature
    statistics), so it is the version a device should predict with; the release as received stays stored.
    """
    model, _, source = eager_model(store, version)
    refit_normalizer(model.normalizer, features)
    meta = {key: source[key] for key in INHERITED if key in source}
    meta |= {"adapted_from": source["version"], "adaptation": "normaliser refitted on this device's recordings",
             "adaptation_size": len(features)}
    return save_version(store, model, source["version"], meta)


def summary(stored: StoredModel) -> str:
    """A readable account of a personalised version: the held-out scores of each model and the gain."""
    meta = stored.meta
    rows = [[VARIANTS[key], s["uar"], s["accuracy"]] for key, s in meta["held_out"].items()]
    rows.append(["gain over global", meta["uar_gain"], meta["accuracy_gain"]])
    lines = [
        f"personalised model v{stored.version:04d} (from v{meta['personalised_from']:04d}) in {stored.path.parent}: "
        f"{meta['adaptation_size']} adaptation, {meta['holdout_size']} held-out utterances",
        table(["held-out", "UAR", "accuracy"], rows),
    ]
    if meta["unusable_files"]:
        lines.append(f"unusable files left out: {meta['unusable_files']}")
    if meta["uar_gain"] < 0:
        lines.append("note: personalisation lowered held-out UAR; the earlier version stays in the store")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.personalise", description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, metavar="STORE_DIR", help="the device's model store")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="the participant's folder (WAV files + labels.csv)")
    parser.add_argument("--holdout", type=float, default=HOLDOUT, help=f"fraction of each emotion held out ({HOLDOUT})")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"full-batch steps fine-tuning the head ({EPOCHS})")
    parser.add_argument("--lr", type=float, default=LR, help=f"Adam learning rate ({LR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adaptation/held-out split (0)")
    parser.add_argument("--json", action="store_true", help="print the new version's meta as JSON")
    args = parser.parse_args(argv)
    try:
        check_settings(args.holdout, args.epochs, args.lr)
    except ValueError as err:
        parser.error(str(err))
    store = ModelStore(args.store)
    try:
        stored = personalise(store, args.data_dir, args.holdout, args.epochs, args.lr, args.seed)
    except StoreError as err:
        return fail(err)
    except CorpusError as err:
        return fail(err, folder=args.data_dir)
    print(to_json({"store": str(store.root), **stored.meta}) if args.json else summary(stored))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
