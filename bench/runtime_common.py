"""What the runtime benchmarks share: MNIST-shaped data, a workspace per configuration, a stage run as
the CLI runs it (its own process: wall time includes start-up, peak RSS is its own), and the sections
of bench/results/runtime.md (each script rewrites its own sections and keeps the others)."""
from __future__ import annotations

import gzip
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
RESULTS = REPO / "bench" / "results" / "runtime.md"
_WRAPPER = (
    "import resource, sys, threading, time\n"
    "peak = [0]\n"
    "def sample():\n"  # anonymous resident memory, read every 5 ms: what the process itself allocated
    "    while True:\n"
    "        try:\n"
    "            for line in open('/proc/self/status'):\n"
    "                if line.startswith('RssAnon:'):\n"
    "                    peak[0] = max(peak[0], int(line.split()[1]))\n"
    "        except OSError:\n"
    "            return\n"
    "        time.sleep(0.005)\n"
    "threading.Thread(target=sample, daemon=True).start()\n"
    "from pipeline.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, peak[0], file=sys.stderr)\n"
    "sys.exit(rc)\n")


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits resized to 28x28 (learnable in seconds, MNIST-shaped)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).numpy(), bunch.target.astype(np.int64)


def mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images (../shared/data/mnist, IDX gzip files) in [0, 1]."""
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{MNIST}/t10k-images-idx3-ubyte.gz not found: this benchmark needs the shared MNIST files")
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return (x.astype(np.float32) / 255.0), y.astype(np.int64)


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def workspace(root: Path, x, y, params: dict) -> Path:
    """A workspace holding (x, y) as an NPZ dataset and `params` over a small base."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "set.npz", x=x, y=y)
    shutil.copytree(REPO / "reports" / "templates", root / "reports" / "templates", dirs_exist_ok=True)
    shutil.copytree(REPO / "policies", root / "policies", dirs_exist_ok=True)
    base = {"seed": 0, "data": {"dataset": "npz", "path": "data/set.npz"},
            "inputs": {"data": "data/set.npz", "model": "pipeline/models.py"},
            "threat": {"norm": "linf", "epsilon": 0.1}}
    (root / "params.yaml").write_text(yaml.safe_dump(merge(base, params)))
    return root


def set_params(root: Path, changes: dict) -> None:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes)))


def stage(root: Path, name: str) -> tuple[float, float]:
    """Run one stage as a subprocess: (wall seconds, peak RSS in MiB of it or of its largest child:
    evaluation shards and torchrun ranks are children)."""
    return stage_memory(root, name)[:2]


def stage_memory(root: Path, name: str) -> tuple[float, float, float]:
    """:func:`stage` plus the stage process's peak anonymous memory in MiB, sampled every 5 ms.
    Peak RSS also counts the pages of memory-mapped files the stage read or wrote (the prepared
    split, the adversarial examples' scratch file): the kernel reclaims those under pressure, so
    anonymous memory is what the stage needs of the machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _WRAPPER, name, "--workspace", str(root)], env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    line = next(l for l in run.stderr.splitlines() if l.startswith("MAXRSS_KB"))
    own, children, anonymous = (int(v) for v in line.split()[1:])
    return seconds, max(own, children) / 1024, anonymous / 1024


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU core(s) ({platform.machine()}), torch {torch.__version__}, {gpu}, "
            f"load average {load:.1f} at the start")


def write_sections(script: str, sections: list[list[str]], tiny: bool) -> None:
    """Replace this script's sections of bench/results/runtime.md (keyed by their `## ` title), keep the
    others. A --tiny smoke run prints only: its figures are no evidence."""
    text = "\n".join("\n".join(s) for s in sections)
    print(text)
    if tiny:
        print("(--tiny: smoke run, bench/results/runtime.md left as it is)")
        return
    stamp = f"_Measured by `python bench/{script}` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._"
    previous = RESULTS.read_text().split("\n## ") if RESULTS.is_file() else ["# Runtime benchmarks\n"]
    titles = {s[0].removeprefix("## ") for s in sections}
    kept = [p for p in previous[1:] if p.split("\n")[0] not in titles]
    body = ["## " + p.rstrip() for p in kept] + ["\n".join(s[:1] + ["", stamp] + s[1:]).rstrip() for s in sections]
    RESULTS.write_text(previous[0].rstrip() + "\n\n" + "\n\n".join(body) + "\n")
