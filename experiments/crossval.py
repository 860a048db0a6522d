"""Speaker k-fold cross-validation: ``python -m experiments.crossval [mode=federated|centralised] [overrides]``.

Runs the experiment once per fold (each fold's held-out speakers never train),
each in ``<run dir>/fold_K/``, and writes ``crossval.json`` and ``crossval.csv``
with per-fold figures and, in ``crossval.json``, their mean and std
(``<field>_mean``, ``<field>_std``) over the folds that report them:

* ``uar`` (each held-out speaker standardised with its own statistics, as its
  device would) and ``uar_new_device`` (with no statistics of the speaker, as a
  device meeting its first utterance would; :mod:`server.evaluation`);
* ``worst_speaker_uar`` (and, per fold, ``worst_speaker``), ``uar_female`` and
  ``uar_male`` (where the corpus gives the sex), accuracy and macro-F1;
* the largest epsilons.

A figure a fold's summary lacks (e.g. a centralised baseline's summary without
the new-device figures) is left empty there and out of the mean.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

#: Per-fold figures averaged over the folds (mean and std each).
AVERAGED = ["uar", "uar_new_device", "worst_speaker_uar", "uar_female", "uar_male", "accuracy", "macro_f1"]
FIELDS = ["fold", "test_speakers", *AVERAGED, "worst_speaker", "epsilon_sample_max", "epsilon_user", "wall_s"]
SEX_FIELDS = {"uar_female": "f", "uar_male": "m"}  # fl_ser.data.corpus.Utterance.sex


def fold_row(k: int, summary: dict) -> dict:
    """One fold's row from its run's summary (``None`` where the summary lacks a figure)."""
    by_sex = summary.get("uar_by_group") or {}
    derived = {"uar_new_device": summary.get("uar_new_device", (summary.get("new_device") or {}).get("uar")),
               **{field: by_sex.get(sex) for field, sex in SEX_FIELDS.items()}}
    return {"fold": k, **{f: derived[f] if f in derived else summary.get(f) for f in FIELDS[1:]}}


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def aggregate(folds: list[dict], mode: str, privacy: str) -> dict:
    """crossval.json's content: mean and std of each :data:`AVERAGED` figure over the folds that have it
    (None where none has it; std 0 for a single fold), the largest epsilons, and the fold rows."""
    result = {"mode": mode, "privacy": privacy, "num_folds": len(folds)}
    for field in AVERAGED:
        values = _finite(f.get(field) for f in folds)
        result[f"{field}_mean"] = statistics.mean(values) if values else None
        result[f"{field}_std"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
        result[f"{field}_folds"] = len(values)
    for field in ("epsilon_sample_max", "epsilon_user"):
        result[field] = max(_finite(f.get(field) for f in folds), default=None)
    result["folds"] = folds
    return result


def fold_line(row: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    return (f"UAR {fmt(row['uar'])} (new device {fmt(row['uar_new_device'])}), worst speaker "
            f"{fmt(row['worst_speaker_uar'])} ({row['worst_speaker'] or '-'}), held out {row['test_speakers']}")


def final_line(result: dict) -> str:
    """The closing console line: each averaged figure's mean +- std over the folds that have it."""
    parts = [f"{field} {result[f'{field}_mean']:.3f} +- {result[f'{field}_std']:.3f}" for field in AVERAGED
             if result[f"{field}_mean"] is not None]
    return f"{result['mode']} {result['privacy']}, {result['num_folds']} folds: " + ", ".join(parts)


def write_results(result: dict, out: Path) -> None:
    """``crossval.csv``, then ``crossval.json`` (the frontier's sign that a point is complete), each atomically."""
    from fl_ser.durable import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, FIELDS)
    w.writeheader()
    w.writerows({**r, "test_speakers": " ".join(r["test_speakers"] or [])} for r in result["folds"])
    write_atomically(out / "crossval.csv", table.getvalue())
    write_atomically(out / "crossval.json", json.dumps(result, indent=2) + "\n")


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
        folds.append(fold_row(k, summary))
        print(f"   fold {k}: {fold_line(folds[-1])}", flush=True)
    result = aggregate(folds, str(cfg.mode), str(cfg.privacy.name))
    write_results(result, out)
    print(f"{final_line(result)} -> {out / 'crossval.json'}", flush=True)
    return result


@hydra.main(config_path="../conf", config_name="crossval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.train import cli

    cli(crossval, cfg)


if __name__ == "__main__":
    main()
