"""Speaker k-fold cross-validation: ``python -m experiments.crossval [mode=federated|centralised] [overrides]``.

Runs the experiment once per fold (each fold's held-out speakers never train),
each in ``<run dir>/fold_K/``, and writes ``crossval.json`` and ``crossval.csv``
with per-fold UAR, accuracy, macro-F1 and epsilons, and their mean and std.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

FIELDS = ["fold", "test_speakers", "uar", "accuracy", "macro_f1", "epsilon_sample_max", "epsilon_user", "wall_s"]


def crossval(cfg: DictConfig) -> dict:
    from experiments.centralised import train_centralised
    from experiments.train import prepare, run

    out = Path(cfg.run_dir)
    folds = []
    for k in range(int(cfg.partition.num_folds)):
        fold_cfg = OmegaConf.merge(cfg, {"partition": {"fold": k}, "run_dir": str(out / f"fold_{k}")})
        print(f"== fold {k + 1}/{cfg.partition.num_folds} ({cfg.mode})", flush=True)
        if cfg.mode == "centralised":
            summary = train_centralised(prepare(fold_cfg))
        elif cfg.mode == "federated":
            summary = run(fold_cfg)
        else:
            raise ValueError(f"mode must be 'federated' or 'centralised', got {cfg.mode!r}")
        folds.append({"fold": k, **{f: summary.get(f) for f in FIELDS[1:]}})
        print(f"   fold {k}: UAR {summary['uar']:.3f}, held out {summary['test_speakers']}", flush=True)
    uars = [f["uar"] for f in folds]
    result = {"mode": cfg.mode, "privacy": cfg.privacy.name, "num_folds": len(folds),
              "uar_mean": statistics.mean(uars), "uar_std": statistics.stdev(uars) if len(uars) > 1 else 0.0,
              "accuracy_mean": statistics.mean(f["accuracy"] for f in folds),
              "macro_f1_mean": statistics.mean(f["macro_f1"] for f in folds),
              "epsilon_sample_max": max((f["epsilon_sample_max"] or 0 for f in folds), default=None) or None,
              "folds": folds}
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossval.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / "crossval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows({**r, "test_speakers": " ".join(r["test_speakers"])} for r in folds)
    print(f"{cfg.mode} {cfg.privacy.name}: UAR {result['uar_mean']:.3f} +- {result['uar_std']:.3f} over "
          f"{len(folds)} folds -> {out / 'crossval.json'}", flush=True)
    return result


@hydra.main(config_path="../conf", config_name="crossval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.train import cli

    cli(crossval, cfg)


if __name__ == "__main__":
    main()
