"""Which model the default params train under each threading and kernel setting, on this processor.

Same params and seed give the same model bit for bit only with the same threads, torch build and
processor: torch orders its reductions by thread, and MKL / oneDNN pick their code path by the CPU
(or by MKL_CBWR / ONEDNN_MAX_CPU_ISA when set). This trains the default `params.yaml` (digits, the
embedded data) once per setting and records the checkpoint's SHA-256 and the runtime record the
train stage wrote, so a reviewer comparing two machines can tell an environment difference from a
code change.

    python bench/model_identity.py          # writes its section of bench/results/runtime.md (~4 min)
    python bench/model_identity.py --tiny   # 2 epochs, two settings; writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.results import KERNEL_VARIABLES
from runtime_common import REPO, write_sections

# (label, params.runtime.threads, environment overrides)
SETTINGS = [
    ("default (2 threads)", 2, {}),
    ("1 thread", 1, {}),
    ("OMP_NUM_THREADS=1, threads 2", 2, {"OMP_NUM_THREADS": "1"}),
    ("MKL_CBWR=COMPATIBLE", 2, {"MKL_CBWR": "COMPATIBLE"}),
    ("MKL_CBWR=AVX2", 2, {"MKL_CBWR": "AVX2"}),
    ("MKL_CBWR=AVX512", 2, {"MKL_CBWR": "AVX512"}),
    ("ONEDNN_MAX_CPU_ISA=AVX2", 2, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("ONEDNN_MAX_CPU_ISA=AVX512_CORE", 2, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
]


def run_stage(root: Path, name: str, overrides: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "pipeline", name, "--workspace", str(root)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name} ({overrides}) failed:\n{run.stderr[-3000:]}")


def workspace(root: Path, tiny: bool) -> Path:
    shutil.copytree(REPO / "reports" / "templates", root / "reports" / "templates")
    shutil.copytree(REPO / "policies", root / "policies")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    if tiny:
        set_params(root, {"train": {"epochs": 2}})
    return root


def set_params(root: Path, changes: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def conclusion(rows: list[tuple]) -> list[str]:
    """What the table shows, computed from it."""
    reference = rows[0][3]
    other = [r[0] for r in rows if r[3] != reference]
    capabilities = sorted({r[2] for r in rows})
    lines = [f"{len({r[3] for r in rows})} distinct model(s) from {len(rows)} settings. "
             + (f"Another model than the default's: {', '.join(other)}." if other
                else "Every setting trained the default's model.")]
    if other and len(capabilities) == 1:
        lines.append(f"torch reported the kernel set {capabilities[0]} under every setting, so the kernel set "
                     "does not tell these models apart: the runtime record also names the processor, and two "
                     "machines agree bit for bit only with `threads` pinned, the same processor and none of "
                     "these variables set differently.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 epochs and two settings; writes nothing")
    args = parser.parse_args()
    settings = SETTINGS[:2] if args.tiny else SETTINGS
    rows, cpu = [], None
    with tempfile.TemporaryDirectory() as tmp:
        root = workspace(Path(tmp), args.tiny)
        run_stage(root, "prepare", {})
        for label, threads, overrides in settings:
            set_params(root, {"runtime": {"threads": threads}})
            run_stage(root, "train", overrides)
            metrics = json.loads((root / "metrics" / "train.json").read_text())
            record = metrics["runtime"]
            cpu = cpu or record["cpu"]
            if record["cpu"] != cpu:
                raise SystemExit(f"the processor changed between runs: {cpu} vs {record['cpu']}")
            if record["environment"] != overrides:
                raise SystemExit(f"{label}: the runtime record says {record['environment']}, not {overrides}")
            rows.append((label, record["threads"], record["cpu_capability"], metrics["model_sha256"]))
            print(f"{label}: {metrics['model_sha256'][:12]}", flush=True)
    section = [
        "## Model identity across threads and kernel paths (default params)",
        "",
        f"The default `params.yaml` (digits, {'2 epochs (--tiny)' if args.tiny else 'as committed'}) trained once "
        f"per setting on one processor: `{cpu}`. The runtime record is the one the train stage wrote; "
        "the environment variable is set for the stage process only (and the record's `environment` names it).",
        "",
        "| setting | runtime.threads | torch kernel set | model.pt SHA-256 |",
        "|---|---:|---|---|",
        *[f"| {label} | {threads} | {capability} | `{sha[:12]}…` |" for label, threads, capability, sha in rows],
        "",
        *conclusion(rows),
    ]
    write_sections("model_identity.py", [section], args.tiny)


if __name__ == "__main__":
    main()
