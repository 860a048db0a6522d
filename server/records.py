"""What a run leaves behind, written as it goes: per-round metrics, checkpoints, progress, summary and plots.

``metrics.jsonl`` (one JSON object per round) and ``metrics.csv`` hold the
per-round figures: the held-out UAR with each test speaker's own statistics
(``uar``) and as a new device would see it (``uar_new_device``), the worst
held-out speaker's UAR both ways (:mod:`server.evaluation`), epsilons and
participation. A row written before a column existed lacks it (empty in the
CSV), and still loads on resume. ``checkpoints/round_NNN.npz`` holds the global
classifier after each round (``checkpoints/state.npz``, :mod:`server.checkpoint`,
what a resumed run needs), ``summary.json`` the final figures, and ``plots/``
the PNGs.

Nothing fails silently. Every round's line says how many sampled devices
returned an update and, for the others, at which stage they dropped and why
(counts of the public error codes devices sent; no device data). A round that
aggregated nothing is an *empty round*: listed in the summary, and after
``federation.max_empty_rounds`` of them in a row the run stops with
:class:`RunStopped`. A device that never returned an update, and a run in which
no round aggregated anything (its release would be the initial model), are
warnings in the console and in ``summary.json``.

A run dir holds one run: results already there are never replaced
(:class:`RunDirInUse`); ``resume=RUN_DIR`` continues the run instead.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fl_ser.durable import write_atomically
from fl_ser.protocol import EPSILON_METRICS

log = logging.getLogger("fl_ser.server")

RESULT_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "checkpoints")


class RunDirInUse(RuntimeError):
    """A new run was pointed at a run dir that already holds a run."""


class RunStopped(RuntimeError):
    """The run stopped early; the message says why and what to do next."""


def earlier_results(run_dir: str | Path) -> list[Path]:
    """The result files of a run already in ``run_dir`` (empty when it holds none)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RESULT_FILES[:3] if (run_dir / name).exists()]
    return found + sorted((run_dir / "checkpoints").glob("*.npz"))


def refuse_reuse(run_dir: str | Path) -> None:
    """Raise :class:`RunDirInUse` when ``run_dir`` already holds a run's results: they are never replaced."""
    found = earlier_results(run_dir)
    if found:
        raise RunDirInUse(
            f"run dir {run_dir} already holds a run ({len(found)} result files, e.g. {found[0].name}); fl-ser never "
            f"replaces results. To continue that run: `python -m experiments.train resume={run_dir}`. To start a "
            "new one: give another dir (`hydra.run.dir=DIR`), or move this one away first.")


def round_line(row: dict, total_rounds: int) -> str:
    """The console line of one recorded round (the simulation prints it; deployment prints it from metrics.jsonl)."""
    def eps(x):
        return "-" if x is None else f"{x:.2f}"

    eps_s = eps(row.get("epsilon_sample_max"))
    run_eps = row.get("epsilon_sample_run_max")
    if run_eps is not None and abs(run_eps - row["epsilon_sample_max"]) > 5e-3:  # devices that trained before
        eps_s += f" (this run {run_eps:.2f})"
    uar_s = f"UAR {row['uar']:.3f}"
    if row.get("uar_new_device") is not None:  # older rows have none
        uar_s += f" (new device {row['uar_new_device']:.3f})"
    parts = [f"round {row['round']:3d}/{total_rounds}", uar_s, f"acc {row['accuracy']:.3f}",
             f"loss {row['loss']:.3f}" if row.get("loss") is not None else "loss -",
             f"eps_sample {eps_s}", f"eps_user {eps(row.get('epsilon_user'))}"]
    if row["round"]:
        parts.append(f"updates {row['participants']}/{row['sampled']}" + (" EMPTY" if row.get("empty") else ""))
        failed = ", ".join(f"{stage} {len(ids)}" for stage, ids in (row.get("dropped") or {}).items() if ids)
        if failed:
            parts.append(f"dropped at {failed}")
        if row.get("malformed"):
            parts.append(f"malformed {len(row['malformed'])}")
        if row.get("causes"):
            parts.append("causes " + ", ".join(f"{c} x{n}" for c, n in row["causes"].items()))
        if row.get("declined"):
            parts.append(f"declined {row['declined']}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)


CSV_FIELDS = ["round", "uar", "accuracy", "macro_f1", "loss", "uar_new_device", "worst_speaker_uar",
              "worst_speaker_uar_new_device", "epsilon_sample_max", "epsilon_sample_run_max", "epsilon_user",
              "sampled", "participants", "declined", "empty", "seconds"]  # rows from before a column: empty there


def _clean(x):
    """JSON-safe: NaN becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _fairness(report: dict) -> dict:
    """A round's per-speaker and new-device figures (:mod:`server.evaluation`; absent from older reports)."""
    new_device = report.get("new_device") or {}
    return {"uar_new_device": new_device.get("uar"), "worst_speaker_uar": report.get("worst_speaker_uar"),
            "worst_speaker": report.get("worst_speaker"),
            "worst_speaker_uar_new_device": new_device.get("worst_speaker_uar"),
            "worst_speaker_new_device": new_device.get("worst_speaker"),
            "uar_by_speaker": report.get("uar_by_speaker"),
            "uar_by_speaker_new_device": new_device.get("uar_by_speaker")}


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class RunRecorder:
    """Records each round as it ends; ``restored`` (:meth:`state` of a killed run) continues that run's files."""

    def __init__(self, run_dir: str | Path, total_rounds: int, user_epsilon_after, max_empty_rounds: int = 3,
                 restored: dict | None = None):
        self.dir = Path(run_dir)
        if restored is None:
            refuse_reuse(self.dir)
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.user_epsilon_after = user_epsilon_after  # rounds -> epsilon or None
        self.max_empty_rounds = max_empty_rounds
        self.rounds: list[dict] = []
        self.epsilons: dict[str, float] = {}  # the largest of each reported epsilon: lifetime, run, parts
        self.devices: dict[str, list[int]] = {}  # node id -> [rounds sampled, rounds its update arrived]
        self.resumed_after: list[int] = []
        self.empty_streak = 0
        self._wall_before = 0.0
        self._fit: dict = {}
        self._t0 = self._last = time.monotonic()
        if restored is not None:
            self._restore(restored)

    # -- resuming ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a resumed run needs to continue these records (saved with the server state each round)."""
        return json.loads(json.dumps({"rows": self.rounds, "epsilons": self.epsilons, "devices": self.devices,
                                      "resumed_after": self.resumed_after, "wall_s": self.wall_s}))  # a snapshot

    def _restore(self, state: dict) -> None:
        self.rounds = list(state["rows"])
        self.epsilons = dict(state["epsilons"])
        self.devices = {k: list(v) for k, v in state["devices"].items()}
        self._wall_before = float(state["wall_s"])
        last = self.rounds[-1]["round"] if self.rounds else 0
        self.resumed_after = [*state["resumed_after"], last]
        # Rows of a round that was in flight when the server died go; that round runs again (each round once).
        write_atomically(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rounds))
        write_atomically(self.dir / "metrics.csv", _csv_text(self.rounds))
        for stale in self.dir.glob("checkpoints/round_*.npz"):
            if int(stale.stem.split("_")[1]) > last:
                stale.unlink()
        (self.dir / "summary.json").unlink(missing_ok=True)  # a stopped run's summary; the resumed run writes anew
        log.warning("resuming %s after round %d of %d", self.dir, last, self.total_rounds)

    @property
    def wall_s(self) -> float:
        return round(self._wall_before + time.monotonic() - self._t0, 2)

    # -- epsilons ----------------------------------------------------------------------------------------------
    @property
    def epsilon_sample_max(self) -> float | None:
        """The largest lifetime sample-level epsilon any device reported (None: none did)."""
        return self.epsilons.get("epsilon")

    def epsilon_split(self) -> dict[str, float] | None:
        """The largest lifetime epsilon, this run's, the normalisation and training parts, and the lifetime epsilon
        against anyone who sees one device's own update (``local``; None: no DP-SGD)."""
        names = dict(zip(EPSILON_METRICS, ("lifetime", "this_run", "normalization", "training", "local"), strict=True))
        return {names[k]: v for k, v in self.epsilons.items()} or None

    # Flower's fit_metrics_aggregation_fn: the devices' plain-text metrics for this round.
    def aggregate_fit_metrics(self, results: list[tuple[int, dict]]) -> dict:
        for key in EPSILON_METRICS:
            eps = [float(m[key]) for _, m in results if key in m]
            if eps:
                self.epsilons[key] = max([*eps, self.epsilons.get(key, 0.0)])
        self._fit = {"participants": len(results), "declined": int(sum(int(m.get("declined", 0)) for _, m in results))}
        return {"epsilon_sample_max": self.epsilon_sample_max or 0.0, **self._fit}

    # -- rounds ------------------------------------------------------------------------------------------------
    def round_done(self, server_round: int, loss: float, report: dict, arrays: list[np.ndarray],
                   outcome: dict | None = None) -> None:
        """Record one round. ``outcome`` says who was sampled (``sampled``: node ids), whose update is in the
        aggregate (``participants``), who dropped out at which stage (``dropped``: stage -> node ids), whose reply
        was malformed (``malformed``: node id -> reason) and the public causes of the failures (``causes``:
        cause -> count); see :mod:`fl_ser.round_report`."""
        now = time.monotonic()
        outcome = outcome or {}
        sampled = [str(n) for n in outcome.get("sampled", [])] if server_round else []
        if "participants" in outcome:  # the devices whose update is in the aggregate
            included = {str(n) for n in outcome["participants"]}
        else:  # no report: the devices that sent fit metrics
            included = set(sampled) if self._fit.get("participants") else set()
        participants = len(included) if "participants" in outcome else self._fit.get("participants", 0)
        participants = participants if server_round else 0
        for node in sampled:
            seen = self.devices.setdefault(node, [0, 0])
            seen[0] += 1
            seen[1] += node in included
        row = {
            "round": server_round, "uar": report["uar"], "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"], "loss": loss, "epsilon_sample_max": self.epsilon_sample_max,
            "epsilon_sample_run_max": self.epsilons.get("epsilon_run"),
            "epsilon_user": self.user_epsilon_after(server_round) if server_round else None,
            "sampled": len(sampled), "participants": participants,
            "declined": self._fit.get("declined", 0) if server_round else 0,
            "empty": bool(server_round) and participants == 0,
            "dropped": {k: sorted(map(str, v)) for k, v in (outcome.get("dropped") or {}).items() if v},
            "malformed": {str(k): v for k, v in (outcome.get("malformed") or {}).items()},
            "causes": dict(outcome.get("causes") or {}),
            "seconds": round(now - self._last, 3), "uar_by_group": report.get("uar_by_group"),
            "confusion": report["confusion"], **_fairness(report),
        }
        self._last = now
        self._fit = {}
        self.rounds.append(_clean(row))
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(self.rounds[-1]) + "\n")
        new = not (self.dir / "metrics.csv").exists()
        with (self.dir / "metrics.csv").open("a", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow(self.rounds[-1])
        buf = io.BytesIO()
        np.savez(buf, *arrays)
        write_atomically(self.dir / "checkpoints" / f"round_{server_round:03d}.npz", buf.getvalue())
        print(round_line(self.rounds[-1], self.total_rounds), flush=True)
        if row["empty"]:
            log.warning("round %d aggregated no update: %d devices sampled, none returned one (%s)", server_round,
                        len(sampled), ", ".join(f"{c} x{n}" for c, n in row["causes"].items()) or "no cause sent")

    def check_progress(self, server_round: int) -> None:
        """After the round's state is saved: stop the run (:class:`RunStopped`) after too many empty rounds."""
        row = self.rounds[-1]
        self.empty_streak = self.empty_streak + 1 if row["empty"] else 0
        if self.max_empty_rounds and self.empty_streak >= self.max_empty_rounds:
            causes = Counter()
            for r in self.rounds[-self.empty_streak:]:
                causes.update(r["causes"])
            why = ", ".join(f"{c} x{n}" for c, n in causes.most_common()) or "no device sent a cause"
            raise RunStopped(
                f"rounds {server_round - self.empty_streak + 1}..{server_round} aggregated no update "
                f"(federation.max_empty_rounds={self.max_empty_rounds}): every sampled device failed. Causes: "
                f"{why}. The devices' own logs say more (README 'When things go wrong'). Fix the cause, then "
                f"continue with `python -m experiments.train resume={self.dir}`.")

    # -- the summary -------------------------------------------------------------------------------------------
    def outcome(self) -> dict:
        """The run's fault accounting for summary.json: empty rounds, dropouts by round and stage, malformed
        replies, devices that never returned an update, resumptions, and warnings a person must see."""
        done = [r for r in self.rounds if r["round"]]
        empty = [r["round"] for r in done if r["empty"]]
        silent = sorted((d for d, (sampled, ok) in self.devices.items() if sampled >= 2 and not ok), key=str)
        warnings = []
        if done and len(empty) == len(done):
            warnings.append("no round aggregated any update: the global model and the release are the initial, "
                            "untrained model; the held-out figures are an untrained model's")
        elif empty:
            warnings.append(f"{len(empty)} of {len(done)} rounds aggregated no update: {empty}")
        if silent:
            warnings.append(f"{len(silent)} devices were sampled in 2 or more rounds and never returned an update "
                            f"(node ids {', '.join(silent[:10])}{' ...' if len(silent) > 10 else ''}); see their logs")
        for w in warnings:
            log.warning("%s", w)
        causes = Counter()
        for r in done:
            causes.update(r["causes"])
        return {
            "rounds_completed": len(done), "trained": bool(done) and len(empty) < len(done),
            "empty_rounds": empty, "resumed_after": self.resumed_after,
            "dropouts": {str(r["round"]): r["dropped"] for r in done if r["dropped"]},
            "malformed": {str(r["round"]): r["malformed"] for r in done if r["malformed"]},
            "failure_causes": dict(causes), "updates": sum(r["participants"] for r in done),
            "updates_sampled": sum(r["sampled"] for r in done), "silent_devices": silent, "warnings": warnings,
        }

    def write_summary(self, summary: dict) -> dict:
        summary = _clean({**summary, "wall_s": self.wall_s,
                          "written": datetime.now(UTC).isoformat(timespec="seconds")})
        write_atomically(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if summary.get("uar") is None:
            return summary
        from server.plots import plot_confusion, plot_rounds

        plot_rounds(self.rounds, self.dir / "plots" / "rounds.png")
        plot_confusion(summary["confusion"], summary["labels"], self.dir / "plots" / "confusion.png",
                       title=f"held-out speakers, UAR {summary['uar']:.3f}")
        return summary
