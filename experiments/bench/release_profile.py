"""``python -m experiments.bench.release_profile [--emodb DIR] [--out DIR] [OVERRIDES ...]``: the release's
parity per format, and where ONNX Runtime spends its time on it.

It releases an untrained model of the config (seeded initial weights, the public normaliser: parity, size and
speed do not depend on the weights) in every format, each checked against the eager model as a release is
(:func:`server.release.release_model`) and, given EmoDB, also on the recordings ``tests/test_release_formats.py``
uses (2.0, 4.0 and 1.3 s). Then, on a 3 s utterance and one thread, it times the ONNX file unprofiled (the best of
5 medians of 51 calls) and profiles it with ONNX Runtime's own profiler: nodes exported, nodes run per call after
ONNX Runtime's optimiser, and kernel time per op type and for the slowest nodes. The profiler adds a few
microseconds to every node, so read its figures as shares, and the unprofiled latency as the time.
Prints a summary and writes ``OUT/release_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

CALLS = 200  # profiled calls
#: The EmoDB recordings a release is checked on here and in tests/test_release_formats.py.
EMODB_FILES = ("03a01Fa.wav", "08a02Ab.wav")


def emodb_waves(emodb: Path) -> list[np.ndarray]:
    """Real waveforms of three lengths from :data:`EMODB_FILES`: the first (2.0 s), both joined (4.0 s), and the
    second's first 1.3 s."""
    from fl_ser.data.audio import read_audio
    from fl_ser.data.corpus import SAMPLE_RATE

    first, second = (read_audio(emodb / "wav" / name) for name in EMODB_FILES)
    return [first, np.concatenate([first, second]), second[: int(1.3 * SAMPLE_RATE)]]


def profile_onnx(path: Path, seconds: float = 3.0, calls: int = CALLS) -> dict:
    """Latency and ONNX Runtime's profile of the ONNX file ``path`` on a ``seconds`` utterance, one thread."""
    import onnx

    from experiments.bench.local import noise_wave
    from fl_ser.models.runtimes import onnx_session
    from fl_ser.timing import best_median_seconds

    data = path.read_bytes()
    wave = noise_wave(seconds, 1)[None].numpy()  # the release rows' input (experiments.bench.local)
    plain = onnx_session(data)
    name = plain.get_inputs()[0].name
    latency = best_median_seconds(lambda: plain.run(None, {name: wave}), calls=51, repeats=5, warmup=5)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = onnx_session(data, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(calls):
            profiled.run(None, {name: wave})
        events = json.loads(Path(profiled.end_profiling()).read_text())
    by_type, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            by_type[op] += event["dur"]
            count[op] += 1
            by_node[f"{event['name'].removesuffix('_kernel_time')} ({op})"] += event["dur"]
    total = sum(by_type.values())
    return {
        "ms_per_call": 1e3 * latency, "real_time_factor": seconds / latency, "seconds": seconds,
        "nodes_exported": len(onnx.load_from_string(data).graph.node),
        "nodes_run_per_call": sum(count.values()) / calls,
        "profiled_kernel_ms_per_call": total / calls / 1e3,
        "op_types": [{"op": op, "nodes": count[op] / calls, "share": us / total} for op, us in by_type.most_common()],
        "slowest_nodes": [{"node": node, "share": us / total} for node, us in by_node.most_common(12)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. features=logmel model=cnn")
    parser.add_argument("--emodb", type=Path, help="EmoDB folder (with wav/): also check each format on 3 recordings")
    parser.add_argument("--out", type=Path, default=Path("outputs/release_profile"), help="folder for the JSON")
    args = parser.parse_args()
    if args.emodb is not None and not (args.emodb / "wav").is_dir():
        parser.error(f"--emodb {args.emodb}: no wav/ folder there; give the EmoDB folder that holds wav/")
    import torch

    from experiments.bench.__main__ import config
    from fl_ser.privacy.normalization import from_config
    from fl_ser.task import get_arrays, new_classifier
    from server.release import release_model

    torch.set_num_threads(1)  # on-device figures are for one core
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(args.out / "run", "release.formats=[onnx,pt2,torchscript]", *args.overrides)
    torch.manual_seed(0)
    classifier = new_classifier(cfg, len(cfg.labels))
    waves = emodb_waves(args.emodb) if args.emodb else []
    print(f"releasing {cfg.features._target_} + {cfg.model._target_} (export and checks: ~30 s) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        release = release_model(cfg, get_arrays(classifier), from_config(cfg).published(), Path(tmp) / "release",
                                waves)
        print("profiling the ONNX file under ONNX Runtime (one thread) ...", flush=True)
        profile = profile_onnx(Path(tmp) / "release" / "emotion_model.onnx")
    result = {"features": str(cfg.features._target_), "model": str(cfg.model._target_),
              "checked_on_emodb": bool(waves), "max_difference": release["max_difference"],
              "unavailable": release["unavailable"],
              "mb": {name: size / 2**20 for name, size in release["bytes"].items() if name.startswith("emotion_model")},
              "onnxruntime": profile}
    (args.out / "release_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    print("largest difference from the eager model: "
          + ", ".join(f"{fmt} {diff:.2g}" for fmt, diff in result["max_difference"].items())
          + (" (test signals and EmoDB)" if waves else " (test signals)"))
    print("files, MB: " + ", ".join(f"{name} {mb:.3f}" for name, mb in result["mb"].items()))
    print(f"ONNX Runtime, {profile['seconds']:g} s utterance, one thread: {profile['ms_per_call']:.2f} ms "
          f"({profile['real_time_factor']:,.0f}x real time); {profile['nodes_exported']:,} nodes exported, "
          f"{profile['nodes_run_per_call']:.0f} run per call")
    print("profiled kernel time by op type (share; nodes per call):")
    for row in profile["op_types"][:12]:
        print(f"  {row['op']:<16} {row['share']:6.1%}  {row['nodes']:4.0f}")
    print(f"written: {args.out / 'release_profile.json'}")


if __name__ == "__main__":
    main()
