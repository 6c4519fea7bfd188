"""Stage `conditions`: robustness under the named triggering conditions of `conditions.threats`.

Per condition: the worst case found by the search (an upper bound), a certificate where one is
possible (enumeration of a finite set, CROWN with branch and bound over a photometric parameter
box), both cross-checked, the heat map and the failures. A condition whose settings, model, data,
code and runtime are unchanged since the last run is carried over from `metrics/conditions.json`
(the run is deterministic, so this is a cache, not an approximation): editing one condition
re-evaluates that one only, while a change to the package's code or to the threads or processor
re-evaluates them all. Every condition is checked against the data before any work, so a bad one
writes nothing.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np

from pipeline import results
from pipeline.conditions.evaluate import evaluate_condition
from pipeline.conditions.threats import from_config
from pipeline.errors import UsageError
from pipeline.io import atomic_write, sha256_file, write_json, write_text
from pipeline.results import ConditionsResult
from pipeline.stages.common import load_data, load_model_for, seed_everything, start_runtime, tensors
from pipeline.workspace import Workspace

ARTIFACTS = "artifacts/conditions"


def config_sha256(params, name: str, model_sha256: str, data_fingerprint: str, runtime: dict) -> str:
    """Everything a condition's figures depend on: its settings, the model, the data, the code that
    computes them, the libraries it calls (bounds, statistics, arrays) and where it ran (threads and
    processor order the floating-point reductions; the runtime record names the torch build)."""
    cfg = params.conditions
    payload = {"condition": cfg.threats[name].model_dump(mode="json"),
               "settings": cfg.model_dump(mode="json", exclude={"threats"}),
               "seed": params.seed, "model": model_sha256, "data": data_fingerprint, "code": package_sha256(),
               "libraries": library_versions(), "runtime": runtime}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


PACKAGE = Path(__file__).resolve().parents[1]
LIBRARIES = ("auto-LiRPA", "numpy", "scipy")


def library_versions() -> dict[str, str]:
    """The installed version of each library besides torch whose code computes a condition's figures."""
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


@functools.cache
def package_sha256(root: Path = PACKAGE) -> str:
    """One digest of every module of the `pipeline` package: any change to the code may change a figure.
    (Coarser than the stage's import closure, which DVC tracks: a change elsewhere in the package only
    re-evaluates conditions that were re-run anyway.)"""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _previous(ws: Workspace) -> dict:
    """The last run's records by name; nothing when the file is absent or no longer valid."""
    try:
        return {k: v for k, v in results.load("conditions", ws.metrics("conditions")).items() if isinstance(v, dict)
                and "config_sha256" in v}
    except (UsageError, OSError):
        return {}


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.conditions
    data, domain, data_fingerprint = load_data(ws, params)
    shape = tuple(data.x["test"].shape[1:])
    conditions = {name: from_config(name, spec, shape) for name, spec in cfg.threats.items()}
    for name, condition in conditions.items():
        condition.check(domain, shape, f"conditions.threats.{name}")
    runtime = start_runtime(params, processes=1)
    model_sha = sha256_file(ws.checkpoint)
    model, _ = load_model_for(ws, params, data, data_fingerprint, runtime.device)
    domain = domain.to(runtime.device)
    if getattr(model, "not_differentiable", None) and cfg.search.gradient != "differences":
        # onnxruntime alone: the descent can still take its gradient signs from forward differences
        print(f"conditions: forward passes only ({model.not_differentiable}): the descent takes its gradient "
              "signs by forward differences, not search.gradient: autograd")
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"gradient": "differences"})})
    seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples, runtime.device)
    previous = _previous(ws)
    folder = ws.root / ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)  # the DVC output exists also when no condition is named
    records = {}
    for name, condition in conditions.items():
        digest = config_sha256(params, name, model_sha, data_fingerprint, runtime.record())
        rows_path, images_path = folder / f"{name}.jsonl", folder / f"{name}.npz"
        old = previous.get(name)
        if old and old["config_sha256"] == digest and rows_path.is_file() and images_path.is_file():
            records[name] = {**old, "reused": True}
            print(f"conditions: {name}: unchanged since the last run, carried over")
            continue
        print(f"conditions: {name}: {condition.describe()} on {len(y)} samples ...")
        evaluation = evaluate_condition(model, x, y, condition, domain, data.num_classes, cfg, params.seed, digest,
                                        smoothing=getattr(cfg.threats[name], "smoothing", None))
        record = evaluation.record
        write_text(rows_path, "".join(json.dumps(row) + "\n" for row in evaluation.rows))
        images = evaluation.failure_images

        def save(tmp, images=images):
            with open(tmp, "wb") as handle:
                np.savez(handle, **images)

        atomic_write(images_path, save)
        records[name] = results.dump(record)
        certified = record.certified_accuracy
        certified_text = (f"certified {certified.value:.3f} ({certified.method})" if certified.status == "ok"
                          else f"certified: {certified.reason}")
        print(f"conditions: {name}: robust {record.robust_accuracy.value:.3f} "
              f"[{record.robust_accuracy.ci[0]:.3f}, {record.robust_accuracy.ci[1]:.3f}], {certified_text}; "
              f"sanity: " + ", ".join(f"{k} {v.status}" for k, v in record.sanity.items()))
        if record.smoothed is not None:
            smooth = record.smoothed
            print(f"conditions: {name}: smoothed over θ ~ N(0, {smooth.sigma:g}²): certified at ±{smooth.radius:g} "
                  f"{smooth.certified_accuracy.value:.3f} (probabilistic, α = {smooth.alpha:g}; "
                  f"{smooth.forward_passes} forward passes in {smooth.seconds:.1f}s)")
    for stale in folder.glob("*") if folder.is_dir() else []:
        if stale.stem not in conditions:
            stale.unlink()
    result = ConditionsResult(seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha,
                              n=len(y), runtime=results.RuntimeRecord(**runtime.record()), **records)
    write_json(ws.metrics("conditions"), results.dump(result))
    return 0
