"""Attack one experiment the way an adversary would: ``python -m experiments.audit [overrides] [--quick]``.

Takes any experiment's overrides (``data=emodb data.root=...``, ``privacy=...``, ``model=...``), runs every attack
of :mod:`experiments.audit` on in-process federations of that experiment's devices, and writes to its run dir:
``audit.json`` (every figure, with its settings), ``audit.md`` (one table per attack) and the plots. ``--quick``
is a smoke test for CI: the same code with few rounds, shadows and trials.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fl_ser.audit")

#: --quick: (setting, value) pairs applied over conf/audit.yaml.
QUICK = ("audit.rounds=3", "audit.attribute.rounds=1", "audit.attribute.shadows_per_speaker=3",
         "audit.attribute.cohorts=8", "audit.attribute.release_federations=3", "audit.attribute.release_rounds=2",
         "audit.membership.shadows=2", "audit.canary.trials=4", "audit.canary.rounds=2", "audit.poisoning.ks=[0,1]",
         "audit.poisoning.rounds=2", "audit.adversarial.snrs=[null,30]", "audit.adversarial.steps=3",
         "audit.adversarial.max_utterances=8")


class Variants:
    """The experiment under other privacy settings: the command line's overrides, minus the keys a setting sets."""

    def __init__(self, overrides: list[str], run_dir: str):
        self.overrides, self.run_dir, self.cache = overrides, run_dir, {}

    def __call__(self, setting) -> DictConfig:
        from experiments.train import override_key, prepare

        setting = [str(s) for s in setting]
        key = tuple(setting)
        if key not in self.cache:
            own = {override_key(s) for s in setting}
            kept = [o for o in self.overrides if override_key(o) not in own and not o.startswith("audit.")]
            cfg = hydra.compose("audit", overrides=[*kept, *setting, f"run_dir={self.run_dir}"])
            self.cache[key] = prepare(OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
        return self.cache[key]


def odd_cohort(size: int, devices: int) -> int:
    """The attribute attack's cohort size: at most ``size``, leaving one device out, and odd (a majority, no ties)."""
    size = min(size, devices - 1)
    return size - (size % 2 == 0)


def run_audit(cfg: DictConfig, overrides: list[str]) -> dict:
    import torch

    from experiments.audit.adversarial import adversarial_audit
    from experiments.audit.attribute import attribute_audit
    from experiments.audit.canary import canary_audit
    from experiments.audit.federation import AuditFederation, corpus_devices
    from experiments.audit.membership import membership_audit
    from experiments.audit.poisoning import poisoning_audit
    from experiments.audit.report import write_report
    from fl_ser.privacy import normalization
    from fl_ser.task import pipeline

    # The audited models are tiny (a linear layer or a small MLP): one intra-op thread runs their thousands of
    # small trainings ~10x faster on a busy 2-core machine than two threads that wait on each other.
    torch.set_num_threads(1)
    run_dir = Path(cfg.run_dir)
    if (run_dir / "audit.json").exists():
        raise SystemExit(f"fl-ser: {run_dir} already holds an audit; choose another hydra.run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    a = cfg.audit
    variants = Variants(overrides, str(run_dir))
    t0 = time.monotonic()

    def progress(text: str) -> None:
        print(f"[audit {time.monotonic() - t0:6.0f} s] {text}", flush=True)

    def federation(setting):
        c = variants(setting)
        return c, AuditFederation(c), corpus_devices(c)

    heldout = corpus_devices(variants([]), "test")  # the attribute attack's disjoint shadow speakers (raw features)

    results: dict = {"experiment": OmegaConf.to_container(variants([]), resolve=True), "quick": bool(a.quick),
                     "timings_s": {}}

    def timed(name, job):
        start = time.monotonic()
        results[name] = job()
        results["timings_s"][name] = round(time.monotonic() - start, 1)
        progress(f"{name} done in {results['timings_s'][name]} s")

    def per_setting(block, attack):
        """``attack(fed, devices)`` under each of ``block.settings`` (privacy overrides), keyed by name."""
        out = {}
        for name, setting in block.settings.items():
            _, fed, devices = federation(setting)
            out[name] = {"overrides": list(setting), **attack(fed, devices)}
        return out

    def attribute():
        b = a.attribute
        return per_setting(b, lambda fed, devices: attribute_audit(
            fed, devices, heldout, rounds=int(b.rounds), shadows_per_speaker=int(b.shadows_per_speaker),
            cohort_size=odd_cohort(int(b.cohort_size), len(devices)),
            cohorts=int(b.cohorts), release_federations=int(b.release_federations),
            release_rounds=int(b.release_rounds), progress=progress))

    def membership():
        return per_setting(a.membership, lambda fed, devices: membership_audit(
            fed, devices, rounds=int(a.rounds), shadows=int(a.membership.shadows), progress=progress))

    def canary():
        return per_setting(a.canary, lambda fed, devices: canary_audit(
            fed, devices[:int(a.canary.devices)], rounds=int(a.canary.rounds), trials=int(a.canary.trials),
            progress=progress))

    def poisoning():
        return poisoning_audit(variants(["privacy=none"]), variants(["privacy=full"]), ks=tuple(a.poisoning.ks),
                               rounds=int(a.poisoning.rounds), progress=progress)

    def adversarial():
        c, fed, devices = federation([])
        arrays = fed.run(devices, int(a.rounds))
        release = pipeline(c, fed.classifier(arrays), normalization.from_config(c).published(), list(c.labels))
        return adversarial_audit(c, release.eval(), snrs=tuple(a.adversarial.snrs), steps=int(a.adversarial.steps),
                                 max_utterances=int(a.adversarial.max_utterances), progress=progress)

    for name, job in (("attribute", attribute), ("membership", membership), ("canary", canary),
                      ("poisoning", poisoning), ("adversarial", adversarial)):
        timed(name, job)
    for name, r in results["canary"].items():
        if r["violation"]:  # a lower bound above the accountant's upper bound: the code or the accounting is wrong
            log.error("canary audit %s: empirical epsilon %.3f exceeds the accountant's %.3f: this is a bug",
                      name, r["epsilon_lower_bound"], r["epsilon_accountant"])
    results["timings_s"]["total"] = round(time.monotonic() - t0, 1)
    (run_dir / "audit.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, run_dir)
    progress(f"audit written to {run_dir}/audit.md and audit.json")
    return results


@hydra.main(config_path="../../conf", config_name="audit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.train import cli

    overrides = list(HydraConfig.get().overrides.task)
    cli(lambda c: run_audit(c, overrides), cfg)


if __name__ == "__main__":
    if "--quick" in sys.argv:  # a flag for people; Hydra takes it as overrides
        sys.argv = [arg for arg in sys.argv if arg != "--quick"] + ["audit.quick=true", *QUICK]
    main()
