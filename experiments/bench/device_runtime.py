"""The device runtime without torch (README "Inference on a device"): its install size, and the peak memory and time
of ``clients.predict`` under onnxruntime on one recording.

The venv is the one ``tests/test_device_venv.py`` checks: a fresh venv, fl-ser installed with ``--no-deps`` and then
the ``device`` extra's packages by name (pyproject.toml), from the package registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Runs ``python -m clients.predict ARGS`` and prints its own peak RSS (KiB) to stderr as the last line: the memory
#: map's high-water mark (VmHWM, Linux). Not getrusage's ru_maxrss, which keeps the forked parent's size across exec.
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['clients.predict', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('clients.predict', run_name='__main__')\n"
         "finally:\n    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
         "    print('peak_rss_kib', hwm[0], file=sys.stderr)\n")


def clean_env() -> dict[str, str]:
    """This process's environment without its Python settings: after an in-process simulation, Flower's Ray backend
    has set PYTHONPATH to the driver's sys.path (the full venv: torch would import, and pip would install
    nothing)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=900, env=clean_env())


def build_device_venv(root: Path) -> Path:
    """A venv at ``root`` with fl-ser (``--no-deps``, editable) and the ``device`` extra; its python."""
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["device"]
    for step in (["--no-deps", "-e", str(REPO)], extra):
        done = run(str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *step, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(step)} into the device venv failed: {done.stderr[-2000:]}")
    return python


def predict_peak(python: Path, store: Path, wav: Path) -> dict:
    """``clients.predict --store STORE WAV --json`` under ``python``: its answer, peak RSS (MiB) and wall time."""
    import time

    t0 = time.perf_counter()
    done = run(str(python), "-c", _PEAK, "--store", str(store), str(wav), "--json", cwd=store.parent)
    wall = time.perf_counter() - t0
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode != 0 or not last.startswith("peak_rss_kib"):
        raise RuntimeError(f"clients.predict failed in the device venv: {done.stderr[-2000:]}")
    return {"answer": json.loads(done.stdout), "peak_rss_mib": int(last.split()[1]) / 1024, "wall_s": wall}


def device_runtime(cfg) -> dict:
    """Install size of the device venv and ``clients.predict`` on a 3 s recording (16 kHz) with the default
    release (an untrained classifier: size and cost do not depend on the weights) under onnxruntime."""
    import soundfile as sf
    from omegaconf import OmegaConf

    from clients.model_store import FILES, ModelStore
    from fl_ser.data.corpus import SAMPLE_RATE
    from fl_ser.models.runtimes import probe_signal
    from fl_ser.privacy.normalization import from_config
    from fl_ser.run_config import config_hash
    from fl_ser.task import get_arrays, new_classifier
    from server.release import release_model

    with tempfile.TemporaryDirectory(prefix="fl-ser-device-bench-") as tmp:
        tmp = Path(tmp)
        python = build_device_venv(tmp / "venv")
        size = subprocess.run(["du", "-sm", str(tmp / "venv")], capture_output=True, text=True, check=True)
        release = tmp / "release"
        onnx_cfg = OmegaConf.merge(cfg, {"release": {"formats": ["onnx", "torchscript"]}})
        release_model(onnx_cfg, get_arrays(new_classifier(cfg, len(cfg.labels))), from_config(cfg).published(),
                      release)
        ModelStore(tmp / "store").add({name: (release / name).read_bytes() for name in FILES
                                       if (release / name).exists()}, list(cfg.labels),
                                      {"round": 0, "config_hash": config_hash(cfg)})
        wav = tmp / "speech.wav"
        sf.write(wav, probe_signal(3.0), SAMPLE_RATE)
        measured = predict_peak(python, tmp / "store", wav)
    return {"device_venv_mb": int(size.stdout.split()[0]), "device_predict_peak_mib": measured["peak_rss_mib"],
            "device_predict_wall_s": measured["wall_s"], "device_python": sys.version.split()[0]}
