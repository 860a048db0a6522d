"""Export a stored or released emotion model for phones: an ExecuTorch program (``.pte``, XNNPACK), checked first.

    python -m clients.export_mobile --store STORE_DIR [--version N] --out FILE.pte [--add] [--max-seconds S] [--time]
    python -m clients.export_mobile --release RUN_DIR/release --out FILE.pte [--max-seconds S] [--time]

The model is rebuilt as the eager pipeline it was released from (its ``config.yaml`` and TorchScript weights, as
``clients.personalise`` does; only fl-ser's own extractors and classifiers), lowered with ExecuTorch's XNNPACK
backend, loaded back with ExecuTorch's runtime and compared with the eager model on test signals, and written only
if every probability agrees within 1e-4 (:mod:`fl_ser.models.mobile`). The program takes one waveform, float32
(1, samples) at 16 kHz, of 0.1 s up to ``--max-seconds`` (30 by default: ExecuTorch plans its memory for the longest
input, so longer input is refused), and returns the probability of each class, in the order of the release's
``labels.json``.

``--store`` takes the store's latest version unless ``--version`` names one. ``--add`` also stores the result as
a new version of the store (the version's files plus ``emotion_model.pte``; its meta records ``pte_from``), which
``python -m clients.predict --store STORE_DIR --runtime executorch FILE`` runs on this computer. ``--time`` then
times the program on a 3 s test signal under ExecuTorch's Python runtime on this computer (the best of 5 medians
of 51 calls, ExecuTorch's default thread pool): a phone's own figure needs a measurement on the phone.

Needs ``pip install fl-ser[mobile]`` (ExecuTorch 1.5.1, about 400 MB with its dependencies; torch is kept). The
lowering takes about a minute for the functionals on one core. Nothing leaves the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from clients.cli import EXIT_OK, fail
from clients.model_store import ARTIFACT, LABELS, STORE_KEYS, ModelStore, StoreError
from fl_ser.models.runtimes import RuntimeMissing
from fl_ser.protocol import MODEL_FILES, RELEASE_CONFIG_FILE

PTE = MODEL_FILES["pte"]


def _release(folder: Path):
    """The eager pipeline of a server release folder and its labels (the files a device's store receives)."""
    from clients.personalise import rebuild

    missing = [name for name in (RELEASE_CONFIG_FILE, LABELS, ARTIFACT) if not (folder / name).is_file()]
    if missing:
        raise StoreError(f"{folder} holds no {' or '.join(missing)}: it is not a release folder. Fix: give a run's "
                         "release folder (RUN_DIR/release), made by fl-ser since releases carry config.yaml")
    config, artifact = (folder / RELEASE_CONFIG_FILE).read_bytes(), (folder / ARTIFACT).read_bytes()
    try:
        labels = json.loads((folder / LABELS).read_text())
        return rebuild(config, artifact, labels, f"the release in {folder}"), labels
    except StoreError:
        raise
    except (RuntimeError, ValueError) as err:  # torch.jit.load's error for a damaged file; a damaged labels.json
        raise StoreError(f"the release in {folder} is damaged ({type(err).__name__}: {str(err).splitlines()[0]}). "
                         "Fix: copy the release folder again from the run") from err


def _latency_ms(path: Path) -> float:
    from fl_ser.models.runtimes import open_model, probe_signal
    from fl_ser.timing import best_median_seconds

    run, wave = open_model("executorch", path.read_bytes()), probe_signal(3.0, seed=5)[None]
    return 1e3 * best_median_seconds(lambda: run(wave), calls=51, repeats=5, warmup=5)


def main(argv: list[str] | None = None) -> int:
    from fl_ser.models.mobile import MAX_SECONDS, MIN_SECONDS

    parser = argparse.ArgumentParser(prog="python -m clients.export_mobile", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", metavar="STORE_DIR", help="a device's model store")
    source.add_argument("--release", metavar="RELEASE_DIR", help="a run's release folder (RUN_DIR/release)")
    parser.add_argument("--version", type=int, metavar="N", help="with --store: the version (default: the latest)")
    parser.add_argument("--out", metavar="FILE.pte", help="write the checked program here (a new file)")
    parser.add_argument("--add", action="store_true",
                        help="with --store: store it as a new version, for clients.predict --runtime executorch")
    parser.add_argument("--time", action="store_true", help="time it on a 3 s test signal here (ExecuTorch's "
                        "Python runtime)")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, metavar="S",
                        help=f"the longest input the program takes (default {MAX_SECONDS:g}, at least "
                             f"{MIN_SECONDS:g}); its memory grows with it")
    args = parser.parse_args(argv)
    if args.release and (args.add or args.version is not None):
        parser.error("--add and --version go with --store; a release folder holds one model and no store")
    if not args.out and not args.add:
        parser.error("say where the program goes: --out FILE.pte, or --add (with --store) to store it")
    if not args.max_seconds >= MIN_SECONDS:
        parser.error(f"--max-seconds must be at least {MIN_SECONDS:g} (the test signals are up to 4.1 s)")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists():
        parser.error(f"{out} already exists; give a new file name (a model is never overwritten)")
    if out is not None and not out.parent.is_dir():
        parser.error(f"the folder {out.parent} does not exist; create it or give another --out")

    from fl_ser.models.export import ExportError
    from fl_ser.models.mobile import export_pte, require_executorch, timed_progress

    try:
        require_executorch()  # before the minutes of work below
        progress = timed_progress()
        if args.store:
            from clients.personalise import eager_model

            store = ModelStore(args.store)
            version = store.latest().version if args.version is None else args.version
            pipe, labels, meta = eager_model(store, version)
            origin = f"model v{version:04d} (round {meta.get('round')}) from {store.root}"
        else:
            pipe, labels = _release(Path(args.release).expanduser())
            origin = f"the release in {args.release}"
        progress(f"{origin}: {len(labels)} emotions {labels}")
        with tempfile.TemporaryDirectory(prefix="fl-ser-pte-") as tmp:
            mobile = export_pte(pipe, out or Path(tmp) / PTE, max_seconds=args.max_seconds, progress=progress)
            stored = None
            if args.add:
                source = store.get(version)
                files = {name: store.read(source, name) for name in source.digests if name != PTE}
                record = {key: value for key, value in meta.items() if key not in STORE_KEYS}
                record |= {"pte_from": version, "pte_max_seconds": args.max_seconds,
                           "pte_max_difference": mobile.max_difference}
                stored = store.add(files | {PTE: mobile.path.read_bytes()}, labels, record)
    except (StoreError, RuntimeMissing, ExportError, FileExistsError, FileNotFoundError) as err:
        return fail(err)
    where = [f"wrote {out}"] if out is not None else []
    if stored is not None:
        where.append(f"stored as v{stored.version:04d} in {stored.path.parent}")
    print(f"{' and '.join(where)}: {mobile.size / 2**20:.2f} MB. It takes one waveform, float32 (1, samples) at "
          f"16 kHz, 0.1 to {mobile.max_seconds:g} s, and gives {len(labels)} probabilities in the order {labels}. "
          f"ExecuTorch allocates {mobile.planned / 2**20:.1f} MB of working memory for it (planned for "
          f"{mobile.max_seconds:g} s: --max-seconds scales it).")
    print(f"It agrees with the eager model within {mobile.max_difference:.2g} (allowed 1e-4) on {mobile.checked_on} "
          f"test inputs. Outside XNNPACK it calls {len(mobile.kernels)} ExecuTorch kernels (a selective runtime "
          f"build needs them): {', '.join(mobile.kernels)}")
    if args.time:
        print(f"a 3 s utterance takes {_latency_ms(mobile.path if out is not None else stored.path / PTE):.2f} ms "
              "under ExecuTorch's Python runtime on this computer (best of 5 medians of 51 calls)")
    if stored is not None:
        print(f"run it here: python -m clients.predict --store {stored.path.parent} --version {stored.version} "
              "--runtime executorch FILE_OR_FOLDER")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
