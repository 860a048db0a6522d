"""Public reference statistics for normalisation: ``python -m experiments.reference_stats out=FILE [overrides]``.

Extracts the experiment's features from every utterance of the configured
corpus and writes their mean and std, with the feature settings they belong
to, as JSON. Run it on a **public** corpus (one whose speakers are not the
federation's devices), then train with
``privacy.normalization.mode=public privacy.normalization.reference=FILE``
(or ``mode=dp``, whose clipping range it sets). Statistics of the
federation's own speakers would defeat the point: they are private data.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def reference_stats(cfg: DictConfig) -> dict:
    from experiments.train import ConfigError
    from fl_ser.data.corpus import CorpusError, corpus_from_config
    from fl_ser.privacy.normalization import statistics_of
    from fl_ser.task import extract, extractor_from_config

    if OmegaConf.is_missing(cfg, "out"):
        raise ConfigError("say where to write the statistics: out=FILE (a JSON file)")
    try:
        corpus = corpus_from_config(cfg)
    except CorpusError as err:
        raise ConfigError(str(err)) from err
    extractor = extractor_from_config(cfg)
    batches = []
    for i, speaker in enumerate(corpus.speakers, 1):
        batches.append(extract(extractor, corpus.load_speaker(speaker)[1]))
        print(f"\r{i}/{len(corpus.speakers)} speakers", end="", flush=True)
    import torch

    x = torch.cat(batches)
    stats = statistics_of(x, tuple(extractor.output_shape), str(extractor.kind))
    out = Path(str(cfg.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"features": OmegaConf.to_container(cfg.features, resolve=True), "source": repr(corpus),
              "num_utterances": len(x), **stats.to_json()}
    out.write_text(json.dumps(record) + "\n")
    print(f"\n{len(x)} utterances of {len(corpus.speakers)} speakers -> {out}", flush=True)
    return record


@hydra.main(config_path="../conf", config_name="reference_stats", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.train import cli

    cli(reference_stats, cfg)


if __name__ == "__main__":
    main()
