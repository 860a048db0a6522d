"""The privacy-utility frontier: ``python -m experiments.frontier [overrides]``.

Sweeps the target epsilon (``frontier.epsilons``, default 1 2 4 8 16) of each
privacy mode (``frontier.modes``, default ``full distributed``; the table
:data:`MODES` says which ``privacy=`` config group each one composes and which
target key it sets), plus one non-private point (``privacy=none``, epsilon =
infinity; ``frontier.non_private=false`` leaves it out). Each point is a whole
speaker k-fold crossval (:func:`experiments.crossval.crossval`,
``partition.num_folds``, 5 by default), so its UAR is a mean over folds with a
std. Every other override is the user's own and applies to every point alike,
e.g. a corpus of one's own::

    python -m experiments.frontier data=emodb data.root=/path/to/emodb frontier.epsilons=[2,8]

Each point's config is composed with Hydra's compose API from the user's
overrides, ``privacy=MODE`` and the mode's target epsilon; a sample-level
target above ``privacy.dp_sgd.epsilon_budget`` raises that point's budget to the
target (every point's devices keep their own ledgers), unless the user set the
budget. ``user_level`` runs only where every fold federates at least
:attr:`Mode.min_devices` devices, and is skipped with a note otherwise.

Outputs, in the run dir (``hydra.run.dir=DIR``, default ``outputs/DATE/TIME``):

- ``<mode>_eps<EPS>/attempt_K/`` and ``none/attempt_K/``: each point's crossval
  (``crossval.json``, ``crossval.csv``, ``fold_*/``);
- ``frontier.csv`` and ``frontier.json`` (under ``points``): one row per
  completed point: ``mode``, ``target_epsilon`` (CSV ``inf``, JSON null for the
  non-private point), ``epsilon`` (achieved, max over folds and devices, of the
  mode's guarantee: ``epsilon_sample_max`` or ``epsilon_user_max``), both of
  those, ``uar_mean``, ``uar_std`` and every other ``*_mean``/``*_std`` figure in
  ``crossval.json`` (accuracy, macro-F1 and, where crossval reports them, per
  group: new device, worst speaker, female, male), ``num_folds``, ``wall_s``,
  ``dir``. ``frontier.json`` also lists the points ``skipped`` (and why) and
  ``failed`` in the latest invocation;
- ``frontier.png`` (:func:`server.plots.plot_frontier`): UAR against the
  achieved epsilon, one line per mode, error bars the std across folds, the
  non-private point a dashed line with its +-std band, one more panel per group;
- ``sweep.json``: the overrides the sweep's points share.

Progress is printed per point (``[k/N] mode=full eps=8 -> UAR ...``, elapsed,
ETA). To resume a sweep that was stopped, run the same command with its run
dir: ``python -m experiments.frontier ... hydra.run.dir=DIR``. A point whose
``crossval.json`` holds all folds is kept; an incomplete one runs again in a
fresh ``attempt_K+1`` (a run dir is never reused and no result is deleted). Other
``frontier.*`` values may change between invocations (more epsilons, another
mode): the outputs are rewritten from every completed point in the dir. Other
overrides may not (the points would not be comparable), apart from how and
where it runs (``experiments.train.RESUMABLE``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.train import RESUMABLE, ConfigError, RunFailed, override_key

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FRONTIER_CONFIG = "frontier"
NON_PRIVATE = "none"
#: ``frontier.csv``'s leading columns; every other ``*_mean``/``*_std`` figure of crossval.json follows, then TAIL.
COLUMNS = ("mode", "target_epsilon", "epsilon", "epsilon_sample_max", "epsilon_user_max", "uar_mean", "uar_std")
TAIL = ("num_folds", "wall_s", "dir")


@dataclass(frozen=True)
class Mode:
    """How one privacy mode is run: the ``privacy=`` group it composes (plus ``overrides``), the key its target
    epsilon sets, the crossval figure that reports the epsilon it achieved, and the fewest devices per fold it is
    meaningful for."""

    privacy: str
    target_key: str
    epsilon_field: str
    what: str
    overrides: tuple[str, ...] = ()
    min_devices: int = 1
    budget_key: str | None = None  # the lifetime budget a target above it needs raised


SAMPLE_LEVEL = {"target_key": "privacy.dp_sgd.target_epsilon", "epsilon_field": "epsilon_sample_max",
                "budget_key": "privacy.dp_sgd.epsilon_budget"}
MODES: dict[str, Mode] = {
    "full": Mode("full", what="local sample-level DP-SGD, clipped updates, SecAgg+", **SAMPLE_LEVEL),
    "dp_sgd": Mode("dp_sgd", what="local sample-level DP-SGD only", **SAMPLE_LEVEL),
    "distributed": Mode("distributed", what="distributed sample-level DP-GD under SecAgg+", **SAMPLE_LEVEL),
    # User-level DP alone, as +experiment=user_level_dp: its unit is a speaker's whole data, so the devices may use
    # their own statistics. Its noise on the mean of n updates has std z*C/n: with few devices it swamps the signal.
    "user_level": Mode("full", "privacy.user_level.target_epsilon", "epsilon_user_max",
                       what="user-level DP-FedAvg: a speaker's whole data", min_devices=50,
                       overrides=("privacy.name=user_level", "privacy.dp_sgd.enabled=false",
                                  "privacy.normalization.mode=local", "privacy.normalization.bound=null")),
}


@dataclass(frozen=True)
class Point:
    """One point of the frontier: a crossval of ``mode`` at ``target_epsilon`` (None: the non-private point),
    composed from ``overrides``; its attempts live in ``dir/attempt_K``."""

    mode: str
    target_epsilon: float | None
    overrides: tuple[str, ...]
    dir: Path

    @property
    def label(self) -> str:
        return f"mode={self.mode} eps={'inf' if self.target_epsilon is None else f'{self.target_epsilon:g}'}"


def as_list(value) -> list:
    """A list setting given as one value (``frontier.modes=full``) or as a list."""
    return [value] if isinstance(value, str | int | float) else list(value)


def point_name(mode: str, target_epsilon: float | None) -> str:
    return NON_PRIVATE if target_epsilon is None else f"{mode}_eps{target_epsilon:g}"


def user_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides that every point shares: all but ``frontier.*``. Settings the frontier makes
    per point are refused, with what to use instead."""
    frontier_set = {"privacy": "frontier.modes=[...]", "resume": "hydra.run.dir=DIR (the same command resumes)",
                    "run_dir": "hydra.run.dir=DIR",
                    **{m.target_key: "frontier.epsilons=[...]" for m in MODES.values()}}
    kept = []
    for override in task_overrides:
        key = override_key(override)
        if key == "frontier" or key.startswith("frontier."):
            continue
        if key in frontier_set:
            raise ConfigError(f"`{override}`: the frontier sets {key} for each point itself; use "
                              f"{frontier_set[key]} instead")
        kept.append(override)
    return kept


def compose_config(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """conf/frontier.yaml composed with ``overrides`` (group choices such as ``privacy=MODE`` included), without
    its ``frontier`` block and unresolved, as crossval takes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():  # inside the frontier's own Hydra job: its config search path
            cfg = compose(FRONTIER_CONFIG, overrides=list(overrides))
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(FRONTIER_CONFIG, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"{err} (composing {' '.join(overrides)})") from None
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("frontier")
    return OmegaConf.create(plain)


def plan(cfg: DictConfig, user: list[str]) -> tuple[list[Point], list[str]]:
    """The sweep's points (the non-private one first, then each mode by ascending epsilon) and notes on how their
    configs differ from a plain ``privacy=MODE`` run."""
    spec = cfg.frontier
    modes = list(dict.fromkeys(as_list(spec.modes)))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"frontier.modes: unknown {unknown}; the modes are {', '.join(MODES)}")
    try:
        epsilons = sorted({float(e) for e in as_list(spec.epsilons)})
    except (TypeError, ValueError):
        epsilons = [math.nan]
    if any(not 0 < e < math.inf for e in epsilons):
        raise ConfigError(f"frontier.epsilons must be positive, finite numbers, got {spec.epsilons} (the "
                          "non-private point is frontier.non_private=true)")
    out = Path(str(cfg.run_dir))
    points, notes = [], []
    if spec.non_private:
        points.append(Point(NON_PRIVATE, None, (*user, f"privacy={NON_PRIVATE}"), out / NON_PRIVATE))
    user_keys = {override_key(o) for o in user}
    for name in modes:
        mode = MODES[name]
        base = (*user, f"privacy={mode.privacy}", *mode.overrides)
        budget = OmegaConf.select(compose_config(base), mode.budget_key) if mode.budget_key else None
        above = [e for e in epsilons if budget is not None and e > budget]
        if above and mode.budget_key in user_keys:
            notes.append(f"{name}: targets {above} exceed {mode.budget_key}={budget} (yours): its devices may "
                         "decline to train before reaching them")
        elif above:
            notes.append(f"{name}: {mode.budget_key} raised from {budget} to the target for eps {above} (each "
                         "point's devices keep their own ledgers)")
        for eps in epsilons:
            raise_budget = (f"{mode.budget_key}={eps:g}",) if eps in above and mode.budget_key not in user_keys else ()
            points.append(Point(name, eps, (*base, *raise_budget, f"{mode.target_key}={eps:g}"),
                                out / point_name(name, eps)))
    return points, notes


def point_config(cfg: DictConfig, point: Point, run_dir: Path) -> DictConfig:
    """The crossval config of one attempt at ``point`` (its feature cache the frontier's own)."""
    point_cfg = compose_config(point.overrides)
    point_cfg.run_dir = str(run_dir)
    point_cfg.cache_dir = str(cfg.cache_dir)  # resolved in the frontier's job (${hydra:runtime.cwd})
    return point_cfg


def training_devices(cfg: DictConfig) -> int:
    """The fewest devices (training speakers) any fold of the crossval federates."""
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import kfold_splits

    corpus = corpus_from_config(cfg)
    folds = kfold_splits(corpus.speakers, int(cfg.partition.num_folds), seed=int(cfg.partition.seed),
                         sex_of=corpus.speaker_sex)
    return min(len(f.train) for f in folds)


def runnable(cfg: DictConfig, points: list[Point]) -> tuple[list[Point], list[dict]]:
    """The points that can run, each checked as :func:`experiments.train.prepare` checks a run (on fold 0), and
    the others with the reason. When none can, the first one's error is raised."""
    from experiments.train import prepare

    ok, skipped, errors = [], [], []
    for point in points:
        point_cfg = OmegaConf.merge(point_config(cfg, point, point.dir), {"partition": {"fold": 0}})
        try:
            checked = prepare(point_cfg)
        except ConfigError as err:
            errors.append(err)
            skipped.append({"mode": point.mode, "target_epsilon": point.target_epsilon, "reason": str(err)})
            continue
        need = MODES[point.mode].min_devices if point.mode in MODES else 1
        devices = training_devices(checked) if need > 1 else need
        if devices < need:
            skipped.append({"mode": point.mode, "target_epsilon": point.target_epsilon, "reason": (
                f"{point.mode} needs at least {need} devices per fold to be useful (its noise on the mean of n "
                f"updates has std z*C/n); this crossval federates {devices}. Use a larger corpus, e.g. "
                "data.num_speakers=1010 as +experiment=user_level_dp does")})
            continue
        ok.append(point)
    if points and not ok and errors:
        raise errors[0]
    return ok, skipped


def completed(point_dir: Path, num_folds: int) -> tuple[Path, dict] | None:
    """The latest attempt at a point whose ``crossval.json`` holds all ``num_folds`` folds, and that result."""
    for attempt in sorted(attempts(point_dir), key=attempt_number, reverse=True):
        try:
            result = json.loads((attempt / "crossval.json").read_text())
        except (OSError, ValueError):
            continue
        folds = result.get("folds") or []
        if result.get("num_folds") == num_folds == len(folds) and all(f.get("uar") is not None for f in folds):
            return attempt, result
    return None


def attempts(point_dir: Path) -> list[Path]:
    return [p for p in point_dir.glob("attempt_*") if p.is_dir() and p.name[len("attempt_"):].isdigit()]


def attempt_number(attempt: Path) -> int:
    return int(attempt.name[len("attempt_"):])


def next_attempt(point_dir: Path) -> Path:
    """A run dir for a new attempt at a point: ``attempt_K+1``, or the latest one if it holds nothing at all."""
    earlier = sorted(attempts(point_dir), key=attempt_number)
    if earlier and not any(earlier[-1].iterdir()):
        return earlier[-1]
    return point_dir / f"attempt_{attempt_number(earlier[-1]) + 1 if earlier else 1}"


def point_row(mode: str, target_epsilon: float | None, result: dict, attempt: Path) -> dict:
    """One row of the frontier from a point's ``crossval.json``: every ``*_mean``/``*_std`` figure in it is kept
    (crossval's per-group figures among them, whichever it reports)."""
    folds = result["folds"]
    user = [f["epsilon_user"] for f in folds if f.get("epsilon_user") is not None]
    row = {"mode": mode, "target_epsilon": target_epsilon, "epsilon": None,
           "epsilon_sample_max": result.get("epsilon_sample_max"), "epsilon_user_max": max(user, default=None),
           **{k: v for k, v in result.items()
              if k.endswith(("_mean", "_std")) and isinstance(v, int | float) and not isinstance(v, bool)},
           "num_folds": result["num_folds"], "wall_s": round(sum(f.get("wall_s") or 0 for f in folds), 1),
           "dir": str(attempt)}
    if mode in MODES:
        row["epsilon"] = row[MODES[mode].epsilon_field]
    return row


POINT_DIR = re.compile(r"(?P<mode>\w+?)_eps(?P<eps>[0-9.e+-]+)")


def collect_rows(out: Path, num_folds: int) -> list[dict]:
    """A row for every completed point in the frontier dir (this invocation's and earlier ones'), the non-private
    point first, then by mode and epsilon."""
    rows = []
    for point_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        match = POINT_DIR.fullmatch(point_dir.name)
        if point_dir.name == NON_PRIVATE:
            mode, eps = NON_PRIVATE, None
        elif match and match["mode"] in MODES:
            mode, eps = match["mode"], float(match["eps"])
        else:
            continue
        done = completed(point_dir, num_folds)
        if done:
            rows.append(point_row(mode, eps, done[1], done[0]))
    return sorted(rows, key=lambda r: (r["target_epsilon"] is not None, r["mode"], r["target_epsilon"] or 0))


def write_frontier(out: Path, rows: list[dict], extra: dict) -> None:
    """``frontier.json`` (the rows under ``points``, plus ``extra``), ``frontier.csv`` and ``frontier.png``."""
    from fl_ser.durable import write_atomically
    from server.plots import plot_frontier

    write_atomically(out / "frontier.json", json.dumps({"points": rows, **extra}, indent=2) + "\n")
    figures = sorted({k for r in rows for k in r} - set(COLUMNS) - set(TAIL))
    text = io.StringIO()
    w = csv.DictWriter(text, [*COLUMNS, *figures, *TAIL], restval="")
    w.writeheader()
    for row in rows:
        w.writerow({**{k: "" if v is None else v for k, v in row.items()},
                    "target_epsilon": "inf" if row["target_epsilon"] is None else row["target_epsilon"]})
    write_atomically(out / "frontier.csv", text.getvalue())
    if rows:
        plot_frontier(rows, out / "frontier.png")


def record_sweep(out: Path, user: list[str], num_folds: int) -> None:
    """Write ``sweep.json`` (the overrides the points share), or, resuming, refuse other overrides than its own,
    operational ones (:data:`experiments.train.RESUMABLE`) apart."""
    path = out / "sweep.json"
    if path.exists():
        stored = [o for o in json.loads(path.read_text())["user_overrides"] if override_key(o) not in RESUMABLE]
        current = [o for o in user if override_key(o) not in RESUMABLE]
        if sorted(stored) != sorted(current):
            raise ConfigError(f"{out} holds a frontier swept with the overrides {stored or 'none'}, this command has "
                              f"{current or 'none'}: their points would not be comparable. Resume it with the same "
                              "overrides (frontier.* may change), or give a new dir (hydra.run.dir=DIR).")
        return
    from fl_ser.durable import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"user_overrides": user, "num_folds": num_folds}, indent=2) + "\n")


def group_by(items: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        groups.setdefault(tuple(item[k] for k in keys), []).append(item)
    return groups


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(row: dict) -> str:
    eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
    return f"UAR {row['uar_mean']:.3f} +- {row['uar_std']:.3f}, epsilon {eps}"


def frontier(cfg: DictConfig, task_overrides: list[str]) -> dict:
    """Run (or resume) the sweep; returns what ``frontier.json`` holds. Raises :class:`RunFailed` after writing
    the outputs when a point failed."""
    from experiments.crossval import crossval

    if cfg.mode != "federated":
        raise ConfigError(f"mode={cfg.mode}: the frontier compares federated privacy modes; the centralised baseline "
                          "has no privacy to sweep (`python -m experiments.crossval mode=centralised`)")
    if not isinstance(cfg.partition.num_folds, int) or cfg.partition.num_folds < 2:
        raise ConfigError(f"partition.num_folds={cfg.partition.num_folds}: each point is a speaker k-fold crossval, "
                          "so it needs at least 2 folds")
    num_folds = int(cfg.partition.num_folds)
    out = Path(str(cfg.run_dir))
    user = user_overrides(task_overrides)
    points, notes = plan(cfg, user)
    done = {p: completed(p.dir, num_folds) for p in points}
    todo, skipped = runnable(cfg, [p for p in points if done[p] is None])
    record_sweep(out, user, num_folds)
    modes = {p.mode: MODES[p.mode] for p in points if p.mode in MODES}
    for name, mode in modes.items():
        composed = " ".join((f"privacy={mode.privacy}", *mode.overrides, f"{mode.target_key}=EPS"))
        print(f"frontier: {name} ({mode.what}): {composed}", flush=True)
    for note in notes:
        print(f"frontier: note: {note}", flush=True)
    for (mode, reason), which in group_by(skipped, ("mode", "reason")).items():
        targets = ", ".join("inf" if s["target_epsilon"] is None else f"{s['target_epsilon']:g}" for s in which)
        print(f"frontier: skipped mode={mode} eps {targets}: {reason}", flush=True)
    shown = [p for p in points if done[p] is not None or p in todo]
    print(f"frontier: {len(shown)} points ({len(todo)} to run, {len(shown) - len(todo)} done earlier) x {num_folds} "
          f"folds -> {out}", flush=True)
    failed, t0, ran = [], time.monotonic(), 0

    def extra() -> dict:
        return {"user_overrides": user, "num_folds": num_folds, "modes": {n: asdict(m) for n, m in modes.items()},
                "notes": notes, "skipped": skipped, "failed": failed}

    for k, point in enumerate(shown, 1):
        if done[point] is not None:
            attempt, result = done[point]
            row = point_row(point.mode, point.target_epsilon, result, attempt)
            print(f"[{k}/{len(shown)}] {point.label} -> {describe(row)} (done earlier: {attempt})", flush=True)
            continue
        attempt = next_attempt(point.dir)
        print(f"[{k}/{len(shown)}] {point.label}: running -> {attempt}", flush=True)
        started = time.monotonic()
        try:
            result, error = crossval(point_config(cfg, point, attempt)), None
        except (ConfigError, RunFailed) as err:
            result, error = None, err
            failed.append({"mode": point.mode, "target_epsilon": point.target_epsilon, "dir": str(attempt),
                           "error": str(err)})
        ran += 1
        elapsed = time.monotonic() - t0
        left = sum(1 for p in shown[k:] if done[p] is None)
        timing = (f"point {duration(time.monotonic() - started)}, elapsed {duration(elapsed)}, "
                  f"ETA {duration(elapsed / ran * left)}")
        outcome = (f"FAILED: {error}" if error else
                   describe(point_row(point.mode, point.target_epsilon, result, attempt)))
        print(f"[{k}/{len(shown)}] {point.label} -> {outcome} | {timing}", flush=True)
        write_frontier(out, collect_rows(out, num_folds), extra())
    rows = collect_rows(out, num_folds)
    write_frontier(out, rows, extra())
    left_out = f" ({len(skipped)} skipped: see frontier.json)" if skipped else ""
    print(f"frontier: {len(rows)} points{left_out} -> {out / 'frontier.csv'}, {out / 'frontier.png'}", flush=True)
    if failed:
        which = "; ".join(f"mode={f['mode']} eps={f['target_epsilon']}: {f['error']}" for f in failed)
        raise RunFailed(f"{len(failed)} frontier point(s) failed: {which}. Re-run the same command with "
                        f"hydra.run.dir={out} to retry them (completed points are kept).")
    return {"points": rows, **extra()}


@hydra.main(config_path="../conf", config_name=FRONTIER_CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.train import cli

    overrides = list(HydraConfig.get().overrides.task)
    cli(lambda c: frontier(c, overrides), cfg)


if __name__ == "__main__":
    main()
