"""The audit's report: ``audit.md`` (one table per attack: setting, figure, chance level) and its PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VIEWS = (("single_update", "one device's update (plain aggregation)"),
         ("all_rounds", "all of a device's updates (plain aggregation)"),
         ("crafted_update", "one update of a trap model (malicious server)"),
         ("cohort_sum", "the cohort's sum (SecAgg+ / CKKS): majority sex"),
         ("difference", "difference of two sums of a trap model (malicious server)"),
         ("release", "the released model: the federation's majority sex"))


def _ci(fig: dict) -> str:
    if fig.get("uar") is None:
        return "n/a"
    lo, hi = fig["ci95"]
    return f"{fig['uar']:.3f} [{lo:.3f}, {hi:.3f}]"


def write_report(results: dict, run_dir: Path) -> None:
    from experiments.audit.adversarial import plot_adversarial
    from experiments.audit.poisoning import plot_poisoning

    exp = results["experiment"]
    lines = ["# Privacy and robustness audit", "",
             f"Experiment: data `{exp['data']['_target_'].rsplit('.', 1)[-1]}`, features "
             f"`{exp['features']['_target_'].rsplit('.', 1)[-1]}`, model `{exp['model'].get('hidden')}`, privacy "
             f"`{exp['privacy']['name']}`, aggregation `{exp['aggregation']['name']}`."
             + (" **--quick: smoke-test settings, figures too coarse to cite.**" if results["quick"] else ""),
             "", f"Timings (s): {results['timings_s']}", ""]
    lines += ["## 1. Attribute inference: a device's sex (Feng et al.)", "",
              "Attack UAR with a 95 % bootstrap interval over speakers; chance 0.5. A speaker's sex is a property "
              "of all their utterances: DP at the utterance level (DP-SGD, distributed DP) bounds it only through "
              "group privacy over every utterance of the speaker, which is no bound at all; only speaker-level DP "
              "(noise calibrated to one device's whole update) holds an attack to (e^eps + delta) / (1 + e^eps).",
              "",
              "| setting | overrides | " + " | ".join(title for _, title in VIEWS) + " |",
              "|---|---|" + "---|" * len(VIEWS)]
    for name, r in results["attribute"].items():
        lines.append(f"| {name} | `{' '.join(r['overrides']) or '(the experiment)'}` | "
                     + " | ".join(_ci(r[v]) for v, _ in VIEWS) + " |")
    lines += ["", "## 2. Membership inference on the release (utterance level)", "",
              "| setting | attack | AUC | TPR at 0.1 % FPR | TPR at 1 % FPR | members / non-members |",
              "|---|---|---|---|---|---|"]
    for name, r in results["membership"].items():
        for attack in ("loss", "lira"):
            f = r[attack]
            lines.append(f"| {name} | {attack} | {f['auc']:.3f} | {f['tpr_at_0.1%_fpr']:.4f} | "
                         f"{f['tpr_at_1%_fpr']:.4f} | {r['members']} / {r['non_members']} |")
        b = r["dp_bound"]
        if b["epsilon_accountant"] is not None:
            lines.append(f"| {name} | most any attack can reach at epsilon {b['epsilon_accountant']:.2f} | "
                         f"{b['auc']:.3f} | {b['tpr_at_0.1%_fpr']:.4f} | {b['tpr_at_1%_fpr']:.4f} | |")
    lines.append("| chance | | 0.500 | 0.0010 | 0.0100 | |")
    lines += ["", "## 3. Empirical epsilon (canary, white-box)", "",
              "| setting | rounds | trials per arm (scored) | TP / FP | epsilon lower bound (95 %) | most this many "
              "trials can show | accountant epsilon | violation |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["canary"].items():
        acc = "none (no DP)" if r["epsilon_accountant"] is None else f"{r['epsilon_accountant']:.3f}"
        lines.append(f"| {name} | {r['rounds']} | {r['trials_per_arm']} ({r['scored_per_arm']}) | "
                     f"{r['true_positives']} / {r['false_positives']} | {r['epsilon_lower_bound']:.3f} | "
                     f"{r['max_measurable']:.3f} | {acc} | {'**YES: a bug**' if r['violation'] else 'no'} |")
    pois = results["poisoning"]
    defences = list(dict.fromkeys(r["defence"] for r in pois["rows"]))
    lines += ["", "## 4. Malicious devices", "",
              f"Held-out UAR (and, for the backdoor, its success rate) after {pois['rounds']} rounds; k of "
              f"{pois['rows'][0]['n']} devices malicious. Target emotion `{pois['target_emotion']}`.", "",
              "| attack | k | " + " | ".join(defences) + " |", "|---|---|" + "---|" * len(defences)]
    cells = {(r["attack"], r["k"], r["defence"]): r for r in pois["rows"]}
    for attack, k in dict.fromkeys((r["attack"], r["k"]) for r in pois["rows"]):
        if k == 0 and attack != "backdoor":
            continue  # k = 0 is one clean federation per defence, shown once (with the trigger's base rate)
        lines.append(f"| {'clean (trigger base rate)' if k == 0 else attack} | {k} | "
                     + " | ".join(_poisoned(cells[attack, k, d]) for d in defences) + " |")
    reasons = sorted({r["reason"] for r in pois["rows"] if not r["applicable"]})
    lines += [*(["", "n/a: " + "; ".join(reasons) + "."] if reasons else []), "", pois["secagg_note"], ""]
    adv = results["adversarial"]
    lines += ["## 5. Adversarial audio (PGD, L-infinity, on the release)", "",
              "| SNR (dB) | accuracy | UAR | flipped | random noise of the same size: accuracy | lowest achieved "
              "SNR (dB) | utterances |", "|---|---|---|---|---|---|---|"]
    for row in adv["rows"]:
        snr = "clean" if row["snr_db"] is None else f"{row['snr_db']:g}"
        low = "" if row.get("achieved_snr_db_min") is None else f"{row['achieved_snr_db_min']:.1f}"
        rnd = "" if row.get("random_accuracy") is None else f"{row['random_accuracy']:.3f}"
        lines.append(f"| {snr} | {row['accuracy']:.3f} | {row['uar']:.3f} | {row.get('flipped', 0):.3f} | {rnd} | "
                     f"{low} | {row['n']} |")
    lines += ["", f"Attack settings: {adv['attack']}", "",
              "Plots: `audit_membership_roc.png`, `audit_attribute.png`, `audit_poisoning.png`, "
              "`audit_adversarial.png`.", ""]
    (run_dir / "audit.md").write_text("\n".join(lines))
    plot_membership(results["membership"], run_dir / "audit_membership_roc.png")
    plot_attribute(results["attribute"], run_dir / "audit_attribute.png")
    plot_poisoning(pois, run_dir / "audit_poisoning.png")
    plot_adversarial(adv, run_dir / "audit_adversarial.png")


def _poisoned(row: dict) -> str:
    if not row["applicable"]:
        return "n/a"
    return f"{row['uar']:.3f}" + ("" if row.get("backdoor_success") is None else f" ({row['backdoor_success']:.2f})")


def plot_membership(membership: dict, path: Path) -> None:
    """ROC curves on log-log axes (the low-FPR region is what matters)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, r in membership.items():
        for attack, style in (("loss", "--"), ("lira", "-")):
            roc = r[attack]["roc"]
            ax.plot(roc["fpr"][1:], [max(t, 1e-4) for t in roc["tpr"][1:]], style,
                    label=f"{name} {attack} (AUC {r[attack]['auc']:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], ":", color="grey", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="true-positive rate",
           title="Membership inference on the release", xlim=(1e-4, 1), ylim=(1e-4, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attribute(attribute: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(attribute), 1)
    for i, (name, r) in enumerate(attribute.items()):
        for j, (view, _) in enumerate(VIEWS):
            f = r[view]
            if f.get("uar") is None:
                continue
            lo, hi = f["ci95"]
            ax.bar(j + i * width, f["uar"], width, yerr=[[f["uar"] - lo], [hi - f["uar"]]],
                   color=f"C{i}", label=name if j == 0 else None, capsize=2)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(VIEWS))], [v for v, _ in VIEWS])
    ax.set(ylabel="attack UAR (sex)", ylim=(0, 1), title="Attribute inference from what the server sees")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
