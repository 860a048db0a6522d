"""The load soak (``make soak``): ``python -m experiments.soak --out DIR [--devices 1000 --per-round 50 --rounds 200]``.

Runs ``python -m experiments.train`` in a subprocess on the synthetic corpus (``--devices`` training speakers with
the default 140 utterances each, plus 10 held out; ``--per-round`` sampled each round; no release to every device
after the last round, as in the scale bench) with the default full privacy stack (DP-SGD with the device ledgers,
clipped updates, SecAgg+) and user-level noise turned on, into ``DIR/run``, with the devices' feature caches in
``DIR/device_caches``; both are replaced at start. While it runs it samples the whole process tree (the driver and
Ray's GCS, raylet and workers) every ``--interval`` seconds: total RSS, the driver's and the largest other
process's RSS, open file descriptors, threads and processes. It follows ``DIR/run/metrics.jsonl`` and closes a
window every ``--every`` rounds (a sample belongs to the window of the round in progress), printing a line each.

Writes ``DIR/soak.csv`` (a row per window, as it goes), ``DIR/soak.json`` (the windows, the growth slopes, the
rounds check, wall time, s/round, the verdict), ``DIR/soak.png`` (RSS and fds per window) and ``DIR/train.log``
(the run's console). Exits 1, naming what failed, if the run fails, if a round is missing, duplicated or empty in
``metrics.jsonl`` or ``checkpoints/``, or if memory, descriptors or threads grow (the tolerances below), or if
no round finishes for ``--stall-s`` seconds; 0 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from experiments.bench.scale import federation_overrides

# Growth is the least-squares slope of each window's figure against the window's last round, over the windows
# after the first (warm-up: Ray starts its workers, they import torch and Opacus). A leak grows linearly with
# rounds; what only grows with the devices seen so far (e.g. Flower's per-node contexts) levels off once nearly
# all have trained (with 50 of 1,000 sampled, 87% by round 40, 99% by round 100). 100 MiB per 100 rounds is ~3%
# of the ~3.3 GB tree: it catches a leak of 1 MiB a round anywhere in the tree (a few KiB per device message),
# while a window's peak moved by under 15 MiB between windows in a trial. Descriptors and threads are counted
# exactly: their tolerance is one leaked per 10 rounds (a leak per round, or per device message, is 100+).
RSS_SLOPE_TOLERANCE_MIB = 100.0  # per 100 rounds, on the window's peak total RSS
FD_SLOPE_TOLERANCE = 10.0        # per 100 rounds, on the window's largest descriptor count
THREAD_SLOPE_TOLERANCE = 10.0    # per 100 rounds, on the window's largest thread count
USER_LEVEL_NOISE = "privacy.user_level.noise_multiplier=1.0"  # the full stack's last layer (off by default)
CSV_FIELDS = ["round", "elapsed_s", "window_s_per_round", "rss_peak_mib", "rss_min_mib", "driver_rss_peak_mib",
              "largest_worker_rss_peak_mib", "largest_worker", "fds_max", "fds_min", "threads_max", "processes_max",
              "samples"]
MIB = 2**20
REPO = Path(__file__).resolve().parents[1]


def train_overrides(out: Path, devices: int, per_round: int, rounds: int) -> list[str]:
    """The Hydra overrides of the soak's run: the full local privacy stack (DP-SGD on each device, clipped updates,
    user-level noise), as measured in issue 10."""
    return ["privacy=full", "model=mlp", *federation_overrides(devices, per_round), f"rounds={rounds}",
            USER_LEVEL_NOISE, f"cache_dir={out / 'device_caches'}", f"hydra.run.dir={out / 'run'}"]


def sample_tree(root: psutil.Process) -> dict | None:
    """One sample of the process tree under ``root`` (None once ``root`` has gone)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    rss, fds, threads, driver, others = 0, 0, 0, 0, []
    for p in procs:
        try:
            with p.oneshot():
                r, n, t = p.memory_info().rss, p.num_fds(), p.num_threads()
                name = p.name()
        except psutil.Error:  # exited between the listing and the reading
            continue
        rss, fds, threads = rss + r, fds + n, threads + t
        if p.pid == root.pid:
            driver = r
        else:
            others.append((r, name))
    largest = max(others, default=(0, ""))
    return {"rss": rss, "driver_rss": driver, "worker_rss": largest[0], "worker": largest[1], "fds": fds,
            "threads": threads, "processes": len(procs)}


def window_row(last_round: int, elapsed_s: float, seconds: list[float], samples: list[dict]) -> dict:
    """A window's row: peaks and minima of its samples, and its mean round time from ``metrics.jsonl``."""
    row = {"round": last_round, "elapsed_s": round(elapsed_s, 1),
           "window_s_per_round": round(sum(seconds) / len(seconds), 2) if seconds else None,
           "samples": len(samples)}
    if not samples:  # a window shorter than the sampling interval
        return {**dict.fromkeys(CSV_FIELDS), **row}
    biggest = max(samples, key=lambda s: s["worker_rss"])
    return {**row, "rss_peak_mib": _mib(max(s["rss"] for s in samples)),
            "rss_min_mib": _mib(min(s["rss"] for s in samples)),
            "driver_rss_peak_mib": _mib(max(s["driver_rss"] for s in samples)),
            "largest_worker_rss_peak_mib": _mib(biggest["worker_rss"]), "largest_worker": biggest["worker"],
            "fds_max": max(s["fds"] for s in samples), "fds_min": min(s["fds"] for s in samples),
            "threads_max": max(s["threads"] for s in samples),
            "processes_max": max(s["processes"] for s in samples)}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def slope_per_100(rounds: list[float], values: list[float | None]) -> float | None:
    """Least-squares slope of ``values`` against ``rounds``, per 100 rounds (None: fewer than two points)."""
    points = [(x, y) for x, y in zip(rounds, values, strict=True) if y is not None]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 100 * sum((x - mx) * (y - my) for x, y in points) / sxx


def growth(windows: list[dict]) -> dict:
    """Slopes per 100 rounds of the windows after the first (warm-up), with the tolerances they are held to."""
    later = windows[1:]
    rounds = [w["round"] for w in later]
    return {"windows_used": len(later),
            "rss_mib_per_100_rounds": slope_per_100(rounds, [w["rss_peak_mib"] for w in later]),
            "fds_per_100_rounds": slope_per_100(rounds, [w["fds_max"] for w in later]),
            "threads_per_100_rounds": slope_per_100(rounds, [w["threads_max"] for w in later]),
            "tolerance": {"rss_mib_per_100_rounds": RSS_SLOPE_TOLERANCE_MIB,
                          "fds_per_100_rounds": FD_SLOPE_TOLERANCE,
                          "threads_per_100_rounds": THREAD_SLOPE_TOLERANCE}}


def growth_failures(g: dict) -> list[str]:
    """What grew beyond its tolerance; fewer than two windows after warm-up cannot show flatness, so that fails too."""
    if g["windows_used"] < 2:
        return [f"only {g['windows_used']} window(s) after warm-up: growth cannot be measured (raise --rounds or "
                "lower --every)"]
    names = {"rss_mib_per_100_rounds": "peak RSS (MiB)", "fds_per_100_rounds": "open file descriptors",
             "threads_per_100_rounds": "threads"}
    return [f"{name} grow by {g[key]:.1f} per 100 rounds after warm-up (tolerance {g['tolerance'][key]})"
            for key, name in names.items() if g[key] > g["tolerance"][key]]


def read_rounds(path: Path) -> list[dict]:
    """The complete lines of a ``metrics.jsonl`` (a line still being written is left for the next read)."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def rounds_check(run_dir: Path, rounds: int) -> dict:
    """Does the run dir hold rounds 1..``rounds`` exactly once each, in ``metrics.jsonl`` and ``checkpoints/``?
    Round 0 (the initial model's evaluation) may appear, once; a round without participants is an empty round."""
    rows = read_rounds(run_dir / "metrics.jsonl")
    seen = [int(r["round"]) for r in rows]
    ckpts = [int(m.group(1)) for p in sorted((run_dir / "checkpoints").glob("round_*.npz"))
             if (m := re.fullmatch(r"round_(\d+)\.npz", p.name))]
    expected = set(range(1, rounds + 1))

    def check(found: list[int]) -> dict:
        return {"missing": sorted(expected - set(found)),
                "duplicated": sorted({r for r in found if found.count(r) > 1}),
                "unexpected": sorted({r for r in found if r not in expected and r != 0})}

    metrics, checkpoints = check(seen), check(ckpts)
    empty = sorted(int(r["round"]) for r in rows if int(r["round"]) in expected and not r.get("participants"))
    complete = not any([*metrics.values(), *checkpoints.values(), empty])
    return {"complete": complete, "metrics": metrics, "checkpoints": checkpoints, "empty_rounds": empty,
            "participants": sum(int(r.get("participants") or 0) for r in rows),
            "declined": sum(int(r.get("declined") or 0) for r in rows)}


def rounds_failures(check: dict) -> list[str]:
    out = []
    for where in ("metrics", "checkpoints"):
        for kind, found in check[where].items():
            if found:
                out.append(f"{where}: rounds {kind}: {found[:20]}{' ...' if len(found) > 20 else ''}")
    if check["empty_rounds"]:
        out.append(f"rounds without participants: {check['empty_rounds'][:20]}")
    return out


def plot(windows: list[dict], path: Path) -> None:
    """RSS (whole tree, driver, largest other process) and descriptor and thread counts per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [w["round"] for w in windows]
    fig, (tree, parts, counts) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    tree.plot(x, [w["rss_peak_mib"] for w in windows], marker="o", label="peak")
    tree.plot(x[1:], [w["rss_min_mib"] for w in windows[1:]], marker="v", label="lowest (after warm-up)")
    tree.set_ylabel("whole tree RSS (MiB)")
    parts.plot(x, [w["driver_rss_peak_mib"] for w in windows], marker="o", label="driver, peak")
    parts.plot(x, [w["largest_worker_rss_peak_mib"] for w in windows], marker="s", label="largest other, peak")
    parts.set_ylabel("process RSS (MiB)")
    counts.plot(x, [w["fds_max"] for w in windows], marker="o", label="open fds, most")
    counts.plot(x, [w["threads_max"] for w in windows], marker="s", label="threads, most")
    counts.set_ylabel("count")
    counts.set_xlabel("round (end of window)")
    for ax in (tree, parts, counts):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the run (it shuts Ray down), then SIGKILL its process group if it has not gone within 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def soak(out: Path, devices: int, per_round: int, rounds: int, every: int, interval: float, stall_s: float) -> dict:
    """Run and watch the soak; returns the summary that ``soak.json`` holds."""
    for old in ("run", "device_caches"):
        shutil.rmtree(out / old, ignore_errors=True)
    for old in ("soak.csv", "soak.json", "soak.png"):
        (out / old).unlink(missing_ok=True)
    command = [sys.executable, "-m", "experiments.train", *train_overrides(out, devices, per_round, rounds)]
    metrics = out / "run" / "metrics.jsonl"
    windows, samples, after_last, failures = [], [], [], []
    print(f"soak: {devices} devices, {per_round} per round, {rounds} rounds, a line every {every} rounds; "
          f"the run's console: {out / 'train.log'}", flush=True)
    t0 = last_progress = time.monotonic()
    done = 0
    with (out / "train.log").open("w") as log, (out / "soak.csv").open("w", newline="") as table:
        writer = csv.DictWriter(table, CSV_FIELDS)
        writer.writeheader()

        def close_windows(rows: list[dict]) -> None:
            nonlocal samples
            while (end := (len(windows) + 1) * every) <= min(done, rounds):
                mine = [x for x in samples if x["in_progress"] <= end]
                samples = [x for x in samples if x["in_progress"] > end]
                seconds = [float(r["seconds"]) for r in rows if end - every < int(r["round"]) <= end]
                windows.append(window_row(end, time.monotonic() - t0, seconds, mine))
                writer.writerow(windows[-1])
                table.flush()
                print(progress_line(windows[-1]), flush=True)

        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                rows = read_rounds(metrics)
                latest = max((int(r["round"]) for r in rows), default=0)
                if latest > done:
                    done, last_progress = latest, time.monotonic()
                elif time.monotonic() - last_progress > stall_s:
                    failures.append(f"no round finished for {stall_s:.0f} s after round {done}: stopped the run")
                    break
                if (s := sample_tree(root)) is not None:
                    (samples if done < rounds else after_last).append({**s, "in_progress": done + 1})
                close_windows(rows)
                time.sleep(interval)
        finally:
            stop_tree(proc)
        rows = read_rounds(metrics)  # the rounds written between the last sample and the exit
        done = max((int(r["round"]) for r in rows), default=0)
        close_windows(rows)
    wall = time.monotonic() - t0
    later = [float(r["seconds"]) for r in rows if int(r["round"]) >= 2]
    first = [float(r["seconds"]) for r in rows if int(r["round"]) == 1]
    summary = {"command": command, "devices": devices, "per_round": per_round, "rounds": rounds, "every": every,
               "interval_s": interval, "exit_code": proc.returncode, "wall_s": round(wall, 1),
               "first_round_s": first[0] if first else None,
               "s_per_round": round(sum(later) / len(later), 2) if later else None,
               "rss_peak_mib_by_window": {w["round"]: w["rss_peak_mib"] for w in windows},
               "rss_peak_mib_after_last_round": _mib(max(x["rss"] for x in after_last)) if after_last else None,
               "growth": growth(windows), "rounds_check": rounds_check(out / "run", rounds), "windows": windows}
    if proc.returncode != 0 and not failures:
        last = (out / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
        failures.append(f"the run exited with {proc.returncode}; the end of {out / 'train.log'}:\n    "
                        + "\n    ".join(last))
    failures += rounds_failures(summary["rounds_check"]) + growth_failures(summary["growth"])
    summary.update({"ok": not failures, "failures": failures})
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    if windows:
        plot(windows, out / "soak.png")
    return summary


def progress_line(w: dict) -> str:
    return (f"soak: round {w['round']:4d} | {w['elapsed_s']:6.0f} s | {w['window_s_per_round']} s/round | RSS peak "
            f"{w['rss_peak_mib']} MiB (driver {w['driver_rss_peak_mib']}, largest other "
            f"{w['largest_worker_rss_peak_mib']} {w['largest_worker']}) | fds {w['fds_min']}-{w['fds_max']} | "
            f"threads {w['threads_max']} | processes {w['processes_max']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the soak's folder (its run/ is replaced)")
    parser.add_argument("--devices", type=int, default=1000, help="training devices (synthetic speakers)")
    parser.add_argument("--per-round", type=int, default=50, help="devices sampled each round")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="rounds per window (a row and a line each)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples of the process tree")
    parser.add_argument("--stall-s", type=float, default=1800.0,
                        help="stop and fail when no round finishes for this long")
    args = parser.parse_args()
    if args.every < 1 or args.rounds < args.every:
        parser.error("need 1 <= --every <= --rounds")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"soak: stopped by signal {signum}"))  # stops the run
    summary = soak(out, args.devices, args.per_round, args.rounds, args.every, args.interval, args.stall_s)
    g = summary["growth"]
    shown = {k: "n/a" if g[k] is None else f"{g[k]:+.1f}"
             for k in ("rss_mib_per_100_rounds", "fds_per_100_rounds", "threads_per_100_rounds")}
    print(f"soak: {summary['wall_s']:.0f} s wall, {summary['s_per_round']} s/round (rounds 2+); per 100 rounds after "
          f"warm-up: RSS {shown['rss_mib_per_100_rounds']} MiB, fds {shown['fds_per_100_rounds']}, threads "
          f"{shown['threads_per_100_rounds']} | {out / 'soak.json'}", flush=True)
    if not summary["ok"]:
        print("soak FAILED:\n  " + "\n  ".join(summary["failures"]), file=sys.stderr)
        sys.exit(1)
    print("soak passed: every round present once, memory, descriptors and threads flat", flush=True)

if __name__ == "__main__":
    main()
