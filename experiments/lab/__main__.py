"""``python -m experiments.lab prepare|rehearse``: the lab's command line.

* ``prepare --devices N --hosts HOST[,HOST...] --out DIR`` writes a lab folder
  (:mod:`experiments.lab.pki`): CA, SuperLink certificate, one key pair per device.
* ``enroll --lab DIR --superlink HOST:PORT`` registers the lab's device keys with
  a running SuperLink (Flower's node authentication).
* ``rehearse --lab DIR [--drop DEVICE@ROUND] [--restart DEVICE@ROUND]
  [--kill-server ROUND | --kill-superlink ROUND] [hydra overrides]`` runs the
  experiment the overrides describe on a loopback lab with that folder's TLS
  material and keys (:mod:`experiments.lab.rehearsal`), injecting the faults
  asked for (a device dropping out or restarting mid-round; the ServerApp or the
  SuperLink dying, then the run resumed); its run dir holds the same outputs as
  a simulation run plus ``devices/`` and ``lab/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.lab.pki import Lab, LabError, prepare_lab

_REHEARSAL: dict = {}  # the rehearse sub-command's own options, read inside the Hydra job


def prepare_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.lab prepare",
                                     description="Prepare a lab folder: CA, SuperLink TLS certificate, device keys.")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (SuperNodes) to enroll")
    parser.add_argument("--hosts", required=True,
                        help="comma-separated host names / IP addresses the devices use to reach the SuperLink")
    parser.add_argument("--out", required=True, help="the lab folder to write")
    parser.add_argument("--force", action="store_true", help="replace the keys of an existing lab folder")
    args = parser.parse_args(argv)
    lab = prepare_lab(args.out, args.devices, args.hosts.split(","), overwrite=args.force)
    print(f"lab ready: {lab.root}\n  SuperLink certificate for {', '.join(lab.hosts)} (signed by {lab.ca_cert})\n"
          f"  {len(lab.devices)} devices enrolled: {', '.join(lab.devices)}\n"
          f"  copy {lab.root / 'devices' / '<device>'}/ to each device (its private key, mode 0600); keep "
          f"{lab.root / 'ca' / 'ca.key'} off the SuperLink machine after preparing")


def enroll_cli(argv: list[str]) -> None:
    from experiments.deployment import CONNECTION, flwr_cli, flwr_env

    parser = argparse.ArgumentParser(prog="python -m experiments.lab enroll",
                                     description="Register the lab's device public keys with a running SuperLink "
                                                 "(started with --enable-supernode-auth).")
    parser.add_argument("--lab", required=True, help="a lab folder made by `prepare`")
    parser.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    args = parser.parse_args(argv)
    lab = Lab.load(args.lab)
    env = flwr_env(lab.root, args.superlink, lab.ca_cert)  # a Flower CLI home in LAB/.flwr
    for device in lab.devices:
        reply = flwr_cli(["supernode", "register", str(lab.enrolled_key(device)), CONNECTION, "--name", device],
                         env, f"enrolling {device}")
        print(f"{device}: enrolled as node {reply['node-id']}")


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def rehearse_main(cfg: DictConfig) -> None:
    from experiments.train import cli

    cli(_rehearse_job, cfg)


def _rehearse_job(cfg: DictConfig) -> dict:
    from experiments.lab.rehearsal import check_faults, devices_for, loopback_federation, rehearse
    from experiments.train import announce, prepare, report
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from server.server_app import expected_devices

    lab = Lab.load(_REHEARSAL["lab"])
    cfg.federation = loopback_federation(cfg, lab)
    resolved = prepare(cfg)
    num_devices = expected_devices(resolved, len(split_from_config(resolved, corpus_from_config(resolved)).train))
    faults, server_fault = tuple(_REHEARSAL["faults"]), _REHEARSAL["server_fault"]
    check_faults(faults, server_fault, devices_for(lab, num_devices), int(resolved.rounds))  # before announce()
    announce(resolved)  # claims the run dir
    summary = rehearse(resolved, lab, num_devices, faults, server_fault, _REHEARSAL["stock"])
    report(resolved, summary)
    rec = summary["rehearsal"]
    stored = {d: (info["report"] or {}).get("version") for d, info in rec["devices"].items()}
    resumed = f"resumed after round {rec['server_kill']['checkpointed_round']}; " if "server_kill" in rec else ""
    print(f"fl-ser lab: model versions stored on devices {stored}; dropped {rec['dropped'] or 'none'}; {resumed}"
          f"rehearsal record {Path(resolved.run_dir) / 'lab' / 'rehearsal.json'}", flush=True)
    return summary


def rehearse_cli(argv: list[str]) -> None:
    from functools import partial

    from experiments.lab.rehearsal import DeviceFault, ServerFault

    parser = argparse.ArgumentParser(prog="python -m experiments.lab rehearse",
                                     description="Rehearse a lab trial on loopback: SuperLink + SuperNodes with the "
                                                 "lab's TLS material and keys. Other arguments are Hydra overrides.")
    parser.add_argument("--lab", required=True, help="a lab folder made by `prepare`")
    parser.add_argument("--drop", type=DeviceFault.parse, action="append", dest="faults", default=[],
                        metavar="DEVICE@ROUND", help="kill DEVICE's SuperNode while it trains in ROUND (rehearse a "
                                                     "dropout), e.g. device-02@2; repeatable")
    parser.add_argument("--restart", type=partial(DeviceFault.parse, restart=True), action="append", dest="faults",
                        metavar="DEVICE@ROUND", help="kill DEVICE's SuperNode while it trains in ROUND, then start it "
                                                     "again (same device dir, ledger and key) once the SuperLink "
                                                     "counts it offline; repeatable")
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--kill-server", type=ServerFault.parse, dest="server_fault", metavar="ROUND",
                        help="SIGKILL the ServerApp once it has checkpointed ROUND, stop its Flower run, and resume "
                             "the experiment (resume=RUN_DIR) as a new run on the same SuperLink and SuperNodes")
    server.add_argument("--kill-superlink", type=partial(ServerFault.parse, superlink=True), dest="server_fault",
                        metavar="ROUND", help="as --kill-server, but SIGKILL the whole SuperLink (its state in "
                                              "lab/superlink.db) and start it again before resuming")
    parser.add_argument("--stock-supernodes", action="store_true",
                        help="run Flower's own flower-supernode with its default waits and cold ClientApp processes "
                             "instead of clients.supernode --warm (a baseline for round times)")
    args, overrides = parser.parse_known_args(argv)
    Lab.load(args.lab)  # fail before Hydra starts if the folder is not a lab
    _REHEARSAL.update(lab=args.lab, faults=args.faults, server_fault=args.server_fault, stock=args.stock_supernodes)
    sys.argv = [f"{sys.argv[0]} rehearse", *overrides]
    rehearse_main()


def main() -> None:
    commands = {"prepare": prepare_cli, "enroll": enroll_cli, "rehearse": rehearse_cli}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    try:
        commands[sys.argv[1]](sys.argv[2:])
    except LabError as err:
        print(f"fl-ser lab: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
