"""``python -m experiments.bench --out DIR [--quick] [--only speed]``: run the benchmarks, write bench.json, bench.md.

``--only speed`` runs only the on-device speed part: the feature extractors' and the release's real-time factors per
runtime (torch eager, ONNX Runtime, torch.export, TorchScript) on one core, and the release files' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def config(run_dir: Path, *overrides: str, cache_dir: Path | None = None):
    """The experiment config with overrides; devices cache features in ``cache_dir`` (default: the shared cache)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.train import prepare

    conf = Path(__file__).resolve().parents[2] / "conf"
    cache = cache_dir or os.environ.get("FL_SER_CACHE", ".cache/fl-ser")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", f"cache_dir={cache}", *overrides])
    return prepare(OmegaConf.create(OmegaConf.to_container(cfg)))


def speed_table_rows(bench: dict) -> list[tuple]:
    def target(row: dict) -> str:
        return "" if row["target"] is None else f"{row['target']} ({'met' if row['met'] else 'missed'})"

    rows = [(row["measure"], row["value"], target(row)) for row in bench["speed_targets"]]
    if "device_venv_mb" in bench:  # experiments.bench.device_runtime
        rows += [("device runtime without torch: venv size, MB (fl-ser's device extra)", bench["device_venv_mb"], ""),
                 ("clients.predict there, 3 s recording, onnxruntime: peak RSS, MiB", bench["device_predict_peak_mib"],
                  ""),
                 ("the same: wall time, s (process start included)", bench["device_predict_wall_s"], "")]
    return rows


def markdown(bench: dict, rows: list[tuple]) -> str:
    m = bench["machine"]
    lines = [f"Machine: {m['cores']} cores, {m['cpu']}, {m['ram_gb']} GB RAM; {bench['date']}", "",
             "| measure | value | target |", "|---|---|---|"]
    for name, value, target in rows:
        shown = "null" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} | {target} |")
    lines += ["", *[f"- {n}" for n in bench["notes"]]]
    return "\n".join(lines) + "\n"


def table(bench: dict) -> str:
    from experiments.bench.aggregation import table_rows

    rows = [("DP-SGD overhead (private / plain epoch, default model), vetted OpenDP noise (default)",
             bench["dp_sgd_overhead"], "<= 2.0"),
            ("the same with Opacus's torch noise (privacy.dp_sgd.vetted_noise=false)",
             bench["dp_sgd_overhead_torch_noise"], "<= 2.0"),
            *[(f"DP-SGD round, vetted / torch noise, {model} ({f['parameters']:,} parameters)", f["ratio"], "")
              for model, f in bench["noise_dp_round"].items()],
            *[(f"vetted noise, {n:,} values, ms (1 core; numpy: {f['numpy_ms']:.2g} ms)", f["vetted_ms"], "")
              for n, f in bench["noise_sampler_ms"].items()],
            *[(f"SecAgg+ overhead, aggregation alone, {n} devices", v, "<= 1.5 at 100")
              for n, v in bench["secagg_overhead"].items()],
            (f"SecAgg+ overhead, whole round of the default experiment, {bench['secagg_default_model_devices']} "
             "devices",
             bench["secagg_overhead_default_model"], "<= 1.5"),
            (f"SecAgg+ mask expansion, fl-ser / Flower ({bench['mask_expansion']['values']:,} values)",
             bench["mask_expansion"]["ratio"], ""),
            ("SecAgg+ round's computation in one process, 100 devices, fl-ser / Flower masks (CPU)",
             bench["secagg_round_compute_cpu_ratio"], "<= 1.05"),
            ("SecAgg+ round in simulation, 100 devices, fl-ser / Flower masks (median)",
             bench["mask_prg_round_ratio"], "<= 1.05"),
            ("SecAgg+ per-device work: power-law exponent in n",
             bench["secagg_per_device_growth"]["power_law_exponent"], "~log n"),
            *table_rows(bench["aggregation_costs"]),
            *speed_table_rows(bench),
            ("1,000 devices / 50 per round: s per round", bench["sim_1000_s_per_round"], ""),
            ("1,000 devices: peak RSS, GB", bench["sim_1000_peak_gb"], "< 6"),
            ("10,000 devices / 100 per round: s per round", bench["sim_10000_s_per_round"], ""),
            ("10,000 devices: peak RSS, GB", bench["sim_10000_peak_gb"], ""),
            ("Deployment Engine round, 3 SuperNodes, full stack: s (clients.supernode --warm)",
             bench["deployment_round_s"], "< 10"),
            ("the same with Flower's stock flower-supernode: s", bench["deployment_stock_round_s"], ""),
            ("Deployment Engine / simulation round time", bench["deployment_vs_simulation"], "")]
    return markdown(bench, rows)


def write(out: Path, bench: dict, text: str) -> None:
    (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    (out / "bench.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, figures meaningless")
    parser.add_argument("--only", choices=("speed",), help="run one part: speed = the extractors' and the release's "
                        "real-time factors per runtime and the release's sizes (one core, minutes)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import torch

    from experiments.bench import aggregation, deployment, federation, local, noise, scale
    from experiments.bench.timing import machine
    from experiments.train import quiet_console
    from fl_ser.task import new_classifier

    quick = ("data.num_speakers=4", "partition.num_test_speakers=1", "data.utterances_per_emotion=2") \
        if args.quick else ()
    quiet_console()
    if (out / "runs").exists():  # the bench's own scratch runs (its results are bench.json and bench.md)
        print(f"bench: clearing its scratch runs of an earlier bench in {out / 'runs'}", flush=True)
        shutil.rmtree(out / "runs")
    cfg = config(out / "runs" / "default", *quick)
    notes = ["Ghost clipping is not measured: fl-ser's trainer uses Opacus hooks mode (the default model's "
             "full-batch DP-GD step has no per-sample-gradient memory problem to solve)."]
    bench = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on-device figures are for one core
    print("feature extractors and the release: speed per runtime, sizes (1 core) ...", flush=True)
    bench.update(local.speed(cfg, config(out / "runs" / "logmel_cnn", *quick, "features=logmel", "model=cnn"),
                             repeats=1 if args.quick else 5))
    speed_note = ("Real-time factors: audio seconds / compute seconds on one core (torch.set_num_threads(1), "
                  "onnxruntime intra_op_num_threads=1), the best of 5 medians (21 calls each for the extractors, 51 "
                  "for the release) on a 3 s utterance; the release files are fl_ser.models.export's (batch and time "
                  "axes dynamic), each run by the runtime of fl_ser.models.runtimes.")
    notes.append(speed_note)
    print("the device runtime without torch: a fresh venv, its size and clients.predict's peak memory ...", flush=True)
    from experiments.bench.device_runtime import device_runtime

    bench.update(device_runtime(cfg))
    if args.only == "speed":
        torch.set_num_threads(threads)
        bench["notes"] = [speed_note]
        write(out, bench, markdown(bench, speed_table_rows(bench)))
        return
    print("on-device training costs (1 core) ...", flush=True)
    bench.update(local.dp_sgd_overhead(cfg))
    latency = bench["release"]
    int8 = local.int8_accuracy(cfg)
    bench.update({"inference_ms_3s": latency["torchscript"]["ms_3s"], "model_mb": latency["mb"]["torchscript"],
                  "int8": {**latency["int8"], **int8}})
    notes.append(f"int8: dynamic quantisation of the Linear layers (TorchScript): {latency['int8']['ms_3s']:.2f} ms, "
                 f"{latency['int8']['mb']:.3f} MB; held-out UAR {int8['uar_float']:.3f} float -> "
                 f"{int8['uar_int8']:.3f} int8 ({int8['uar_change']:+.3f}) for the default model trained centrally "
                 f"without DP ({int8['test_utterances']} utterances).")
    torch.set_num_threads(threads)
    print("vetted DP noise (1 core) ...", flush=True)
    bench.update(noise.noise_costs(quick=args.quick))

    print("secure aggregation ...", flush=True)
    shapes = [tuple(p.shape) for p in new_classifier(cfg, len(cfg.labels)).parameters()]
    bench.update(federation.secagg_overhead(shapes, counts=(3, 5) if args.quick else (10, 50, 100, 200)))
    print("SecAgg+ masks: fl-ser's ChaCha20 against Flower's 32-bit-seeded Mersenne Twister ...", flush=True)
    bench["mask_expansion"] = federation.mask_expansion_cost(shapes, repeats=20 if args.quick else 2000)
    bench.update(federation.secagg_round_compute(shapes, num_devices=3 if args.quick else 100,
                                                 repeats=1 if args.quick else 5))
    bench.update(federation.mask_prg_overhead(shapes, num_devices=3 if args.quick else 100,
                                              alternations=1 if args.quick else 2))
    print("aggregation side by side: plain, SecAgg+, CKKS ...", flush=True)
    bench.update(aggregation.aggregation_costs(aggregation.default_models(out / "runs" / "models", quick=args.quick),
                                               counts=(3,) if args.quick else (10, 100),
                                               rounds=2 if args.quick else 3))
    notes += aggregation.notes(bench["aggregation_costs"])
    devices = 3 if args.quick else 100
    whole = ("privacy=full", "model=mlp", f"data.num_speakers={devices + 4}", "partition.num_test_speakers=4",
             "rounds=4", "release.deploy=false",
             *(("data.utterances_per_emotion=2",) if args.quick else ()))
    bench.update(federation.default_model_overhead(
        config(out / "runs" / "secagg_default_plain", *whole, "aggregation=plain"),
        config(out / "runs" / "secagg_default_secagg_plus", *whole, "aggregation=secagg_plus")))

    print("simulation scale ...", flush=True)
    for size, sampled, key in ((1000, 50, "sim_1000"), (10000, 100, "sim_10000")):
        if args.quick:
            size, sampled = 6, 3
        test = 2 if args.quick else 10
        cold = out / "runs" / f"{key}_device_caches"  # every sampled device featurises its recordings afresh,
        shutil.rmtree(cold, ignore_errors=True)       # so figures do not depend on what earlier runs left
        sim = scale.simulate_scale(config(out / "runs" / key, "+experiment=user_level_dp",
                                          *scale.federation_overrides(size, sampled, test), "rounds=3",
                                          cache_dir=cold))
        shutil.rmtree(cold, ignore_errors=True)
        bench[f"{key}_s_per_round"], bench[f"{key}_peak_gb"] = sim["s_per_round"], sim["peak_gb"]
        print(f"  {size} devices, {sampled} per round: {sim['s_per_round']:.1f} s/round, "
              f"peak {sim['peak_gb']:.2f} GB", flush=True)
    notes.append("Simulation scale: device feature caches start empty, so a sampled device synthesises and "
                 "featurises its recordings the first time it trains (with 50 of 1,000 or 100 of 10,000 sampled "
                 "per round, nearly every sampled device is new); rounds 2-3 are averaged.")
    print("deployment engine vs simulation (3 devices, full stack) ...", flush=True)
    bench.update(deployment.deployment_vs_simulation(out, os.environ.get("FL_SER_CACHE", ".cache/fl-ser"),
                                                     rounds=3, stock=not args.quick))
    notes.append(f"Deployment Engine: median round {bench['deployment_round_s']} s with clients.supernode --warm, "
                 f"{bench['deployment_stock_round_s']} s with Flower's stock flower-supernode, simulation "
                 f"{bench['simulation_round_s']} s (3 devices on loopback, TLS, node auth, full privacy stack).")
    bench["notes"] = notes
    write(out, bench, table(bench))


if __name__ == "__main__":
    main()
