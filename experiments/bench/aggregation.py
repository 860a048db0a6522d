"""Plain, SecAgg+ and CKKS aggregation side by side: round time, traffic, device CPU, exchanges, error vs plain.

:func:`aggregation_costs` runs the fixed-update federation
(:func:`experiments.bench.federation.fixed_update_federation`: the real device
mods and server workflows, devices returning a fixed update) once per
aggregation with the same updates, at each device count and model size, and
:func:`ckks_server_sum_cpu` times the CKKS server's own work, the homomorphic
sum, in this process. :func:`table_rows` and :func:`notes` turn the figures
into ``make bench`` rows and the "where CKKS beats SecAgg+, where it loses"
line, from the measured numbers only.

Run on its own: ``python -m experiments.bench.aggregation [--quick]``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from experiments.bench.federation import AGGREGATIONS, harness_config, round_cost, seeded_update

NAMES = {"plain": "plain", "secagg_plus": "SecAgg+", "ckks": "CKKS"}
#: The figures compared between CKKS and SecAgg+ in :func:`notes`: key, what it is, unit, scale.
COMPARED = (("round_s", "round time", "s", 1.0),
            ("exchanges_per_round", "message exchanges per round", "", 1.0),
            ("up_bytes_per_device_round", "upload per device per round", "KB", 1e-3),
            ("down_bytes_per_device_round", "download per device per round", "KB", 1e-3),
            ("device_cpu_s_per_round", "device CPU per round", "ms", 1e3))


def ckks_server_sum_cpu(shapes: list[tuple], num_devices: int, repeats: int = 3) -> float:
    """CPU seconds of the CKKS server's homomorphic sum for one round (best of ``repeats``): load
    ``num_devices`` encrypted updates of ``shapes`` under the keyless context, add them, serialize the sum."""
    from clients.ckks_mod import params_of, precision
    from fl_ser.privacy.ckks import add_all, encrypt, keyless_context, load_ciphertexts, new_context, quantise

    cfg = harness_config("ckks")
    params = params_of(cfg)
    flat = np.concatenate([u.ravel() for u in seeded_update(shapes, 0)] + [np.ones(1, dtype=np.float32)])
    blobs = encrypt(new_context(params), quantise(flat, precision(cfg)), params)  # a device's update and weight
    server = keyless_context(params)
    best = math.inf
    for _ in range(repeats):
        c0 = time.process_time()
        total = add_all([load_ciphertexts(server, blobs, params, flat.size) for _ in range(num_devices)])
        for vector in total:
            vector.serialize()
        best = min(best, time.process_time() - c0)
    return best


def aggregation_costs(models: dict[str, list[tuple]], counts=(10, 100), rounds: int = 3) -> dict:
    """For each model (name -> parameter shapes) and device count, :func:`~experiments.bench.federation.round_cost`
    of each aggregation, with ``max_abs_error_vs_plain`` (the largest difference between the global model after
    round 1 and plain aggregation's) and, for CKKS, ``server_sum_cpu_s``."""
    out: dict = {}
    for model, shapes in models.items():
        out[model] = {"parameters": sum(math.prod(s) for s in shapes), "devices": {}}
        for n in counts:
            costs = {name: round_cost(n, name, shapes, rounds=rounds) for name in AGGREGATIONS}
            reference = costs["plain"]["first_global"]
            for cost in costs.values():
                cost["max_abs_error_vs_plain"] = max(float(np.abs(a - b).max())
                                                     for a, b in zip(cost.pop("first_global"), reference, strict=True))
            costs["ckks"]["server_sum_cpu_s"] = ckks_server_sum_cpu(shapes, n)
            out[model]["devices"][str(n)] = costs
            print(f"  {model}, {n} devices: " + "; ".join(
                f"{NAMES[k]} {c['round_s']:.2f} s, up {c['up_bytes_per_device_round'] / 1e3:.1f} KB, "
                f"CPU {1e3 * c['device_cpu_s_per_round']:.1f} ms, error {c['max_abs_error_vs_plain']:.1e}"
                for k, c in costs.items()), flush=True)
    return {"aggregation_costs": out}


def _side_by_side(costs: dict, key: str, scale: float = 1.0) -> str:
    return " / ".join(f"{scale * costs[name][key]:.3g}" for name in AGGREGATIONS)


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """``make bench`` rows: (measure, "plain / SecAgg+ / CKKS" values, target)."""
    rows = []
    modes = " / ".join(NAMES[a] for a in AGGREGATIONS)
    for model, by_model in results.items():
        for n, costs in by_model["devices"].items():
            where = f"aggregation alone, {model} ({by_model['parameters']:,} parameters), {n} devices"
            rows += [(f"{where}: round time, s, {modes}", _side_by_side(costs, "round_s"), ""),
                     (f"{where}: message exchanges per round, {modes}", _side_by_side(costs, "exchanges_per_round"),
                      ""),
                     (f"{where}: KB sent per device per round, {modes}",
                      _side_by_side(costs, "up_bytes_per_device_round", 1e-3), ""),
                     (f"{where}: KB received per device per round, {modes}",
                      _side_by_side(costs, "down_bytes_per_device_round", 1e-3), ""),
                     (f"{where}: device CPU per round outside training, ms, {modes}",
                      _side_by_side(costs, "device_cpu_s_per_round", 1e3), ""),
                     (f"{where}: max abs error of the aggregate vs plain, {modes}",
                      _side_by_side(costs, "max_abs_error_vs_plain"), "CKKS <= 1e-5"),
                     (f"{where}: CKKS server's homomorphic sum, CPU ms per round",
                      f"{1e3 * costs['ckks']['server_sum_cpu_s']:.3g}", "")]
    return rows


def notes(results: dict) -> list[str]:
    """One line per model and device count: the measured figures where CKKS beats SecAgg+ and where it loses."""
    lines = []
    for model, by_model in results.items():
        for n, costs in by_model["devices"].items():
            ckks, secagg = costs["ckks"], costs["secagg_plus"]
            better, worse = [], []
            for key, what, unit, scale in COMPARED:
                a, b = ckks[key], secagg[key]
                text = f"{what} ({scale * a:.3g} vs {scale * b:.3g}{' ' + unit if unit else ''}, x{a / b:.2g})"
                (better if a < b else worse).append(text)
            lines.append(f"CKKS vs SecAgg+, aggregation alone, {model} ({by_model['parameters']:,} parameters), {n} "
                         f"devices: CKKS beats SecAgg+ on {', '.join(better) or 'nothing measured'}; it loses on "
                         f"{', '.join(worse) or 'nothing measured'} (the round's one decryptor also receives the "
                         f"encrypted sum, {1e-3 * ckks['stages']['ckks_decrypt']['down_bytes']:.3g} KB). CKKS's "
                         "aggregate is within "
                         f"{ckks['max_abs_error_vs_plain']:.1e} of plain's (SecAgg+'s: "
                         f"{secagg['max_abs_error_vs_plain']:.1e}).")
    return lines


def default_models(scratch: Path, quick: bool = False) -> dict[str, list[tuple]]:
    """The default model's parameter shapes and (unless ``quick``) those of the MLP [64, 32] on functionals, from
    the experiment config (its run folders under ``scratch``)."""
    from experiments.bench.__main__ import config
    from fl_ser.task import new_classifier

    variants = {"default model": ()}
    if not quick:
        variants["MLP [64, 32]"] = ("model=mlp", "model.hidden=[64,32]")
    shapes = {}
    for i, (name, overrides) in enumerate(variants.items()):
        cfg = config(scratch / f"model_{i}", *overrides)
        shapes[name] = [tuple(p.shape) for p in new_classifier(cfg, len(cfg.labels)).parameters()]
    return shapes


def main() -> None:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 devices, 2 rounds, the default model")
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    models = default_models(Path(tempfile.mkdtemp(prefix="fl-ser-bench-models-")), quick=args.quick)
    results = aggregation_costs(models, counts=(3,) if args.quick else tuple(args.counts),
                                rounds=2 if args.quick else 3)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, value, _ in table_rows(results["aggregation_costs"]):
        print(f"| {name} | {value} |")
    print("\n".join(notes(results["aggregation_costs"])))


if __name__ == "__main__":
    main()
