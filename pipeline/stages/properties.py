"""Stage `properties`: the run's claims as VNNLIB, and listed VNNLIB properties decided.

Claims: one L∞ robustness property per certified test sample at the threat's ε (the box
clipped to the data domain, in the shipped ONNX file's input layout), with an
instances.csv, so another verifier can re-check exactly what the report claims.
Instances: a VNN-COMP instances.csv (`onnx,vnnlib,timeout` per row, paths relative to the
CSV) decided one by one with `robustgate prove`; per-instance answers and totals go to the
metrics, where a policy can require e.g. `properties.unsat_fraction >= 1`.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline import vnnlib
from pipeline.errors import UsageError
from pipeline.inputs import properties_folder
from pipeline.io import confine, sha256_file, write_json, write_text
from pipeline.prove_cli import prove_files, result_text
from pipeline.results import InstanceRecord, NotApplicable, PropertiesResult, dump
from pipeline.stages.common import load_data, seed_everything
from pipeline.supplied.onnx_torch import OnnxRunner
from pipeline.workspace import Workspace

STATUSES = ("unsat", "sat", "unknown", "timeout")


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.properties
    data, _, data_fingerprint = load_data(ws, params)
    seed_everything(params.seed)
    csv_path = confine(cfg.instances, ws.root, "properties.instances") if cfg.instances else None
    instances = read_instances(csv_path, properties_folder(params, ws.root)) if csv_path is not None else None
    out = ws.root / "artifacts" / "properties"
    fresh = out.with_name(".properties.tmp")
    shutil.rmtree(fresh, ignore_errors=True)
    (fresh / "claims").mkdir(parents=True)
    written, where = write_claims(ws, params, data, fresh / "claims")
    records: list[InstanceRecord] | None = None
    if instances is not None:
        (fresh / "results").mkdir()
        records, counterexamples = [], []
        for number, (model, prop, timeout) in enumerate(instances):
            answer = prove_files(model, prop, timeout)
            result = fresh / "results" / f"{number:04d}.txt"
            write_text(result, result_text(answer))
            records.append(InstanceRecord(
                onnx=_shown(model, ws.root), vnnlib=_shown(prop, ws.root), timeout_s=timeout, status=answer.status,
                phase=answer.phase, seconds=round(answer.seconds, 3),
                result_file=f"artifacts/properties/results/{number:04d}.txt", notes=answer.notes,
                onnx_sha256=sha256_file(model), vnnlib_sha256=sha256_file(prop)))
            if answer.status == "sat":
                counterexamples.append((number, model, prop, answer))
            print(f"properties: {_shown(prop, ws.root)}: {answer.status} ({answer.phase}, {answer.seconds:.2f}s)")
        save_counterexamples(fresh / COUNTEREXAMPLES, counterexamples, data.x["test"].shape[1:], params)
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    totals = {s: sum(r.status == s for r in records) for s in STATUSES} if records is not None else {}
    none_listed = NotApplicable(status="not_run", reason="properties.instances lists no instances file")
    write_json(ws.metrics("properties"), dump(PropertiesResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=sha256_file(ws.checkpoint),
        instances=records if records is not None else none_listed, totals=totals,
        unsat_fraction=(totals["unsat"] / len(records) if records else none_listed) if records is not None
        else none_listed,
        claims_written=written, claims=where,
        instances_sha256=sha256_file(csv_path) if csv_path is not None else None,
    )))
    summary = ", ".join(f"{v} {k}" for k, v in totals.items()) if totals else "no instances listed"
    print(f"properties: {written} claims written as VNNLIB; instances: {summary}")
    return 0


COUNTEREXAMPLES = "counterexamples.npz"


def save_counterexamples(path: Path, found: list, data_shape, params) -> None:
    """The sat instances' counterexamples next to their box centres, in the data's (C, H, W) layout,
    for the report to draw: only when the data is an image and a counterexample has its size (read
    in the run's model layout); otherwise nothing is written and the report shows the table alone."""
    data_shape = tuple(int(d) for d in data_shape)
    if len(data_shape) != 3 or data_shape[0] not in (1, 3):
        return
    size = int(np.prod(data_shape))
    from_file = _data_layout(params, data_shape)
    rows = []
    for number, model, prop, answer in found:
        if answer.x is None or answer.x.size != size:
            continue
        region = min(vnnlib.load(prop).regions, key=lambda r: float(np.abs(r.lower - answer.x).sum() +
                                                                    np.abs(r.upper - answer.x).sum()))
        centre = (np.clip(region.lower, -1e6, 1e6) + np.clip(region.upper, -1e6, 1e6)) / 2
        runner = OnnxRunner(model)
        at_centre = runner(centre.astype(np.float32).reshape(1, *runner.input.shape[1:]))
        rows.append((number, from_file(centre), from_file(answer.x), int(np.argmax(at_centre)),
                     int(np.argmax(answer.y))))
    if rows:
        np.savez(path, instance=np.array([r[0] for r in rows]), centre=np.stack([r[1] for r in rows]),
                 x=np.stack([r[2] for r in rows]), centre_prediction=np.array([r[3] for r in rows]),
                 prediction=np.array([r[4] for r in rows]))


def _data_layout(params, data_shape):
    """Flat values in the run's model layout -> (C, H, W)."""
    c, h, w = data_shape
    if params.model.supplied and params.model.source == "onnx" and params.model.layout == "nhwc":
        return lambda v: np.transpose(np.asarray(v, dtype=np.float32).reshape(h, w, c), (2, 0, 1))
    return lambda v: np.asarray(v, dtype=np.float32).reshape(c, h, w)


def read_instances(path: Path, root: Path) -> list[tuple[Path, Path, float]]:
    """Rows `onnx,vnnlib,timeout`, paths relative to the CSV's folder; every file must exist and lie
    inside `root`, the folder DVC tracks for them (`inputs.properties`; DVC cannot template deps
    from a CSV's rows), and the stage hashes each listed file into its metrics."""
    if not path.is_file():
        raise UsageError(f"properties.instances = {path}: no such file")
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise UsageError(f"{path}:{line}: expected 3 columns onnx,vnnlib,timeout; got {len(row)}")
            model, prop = (path.parent / row[0].strip()), (path.parent / row[1].strip())
            try:
                timeout = float(row[2])
            except ValueError:
                raise UsageError(f"{path}:{line}: timeout {row[2]!r} is not a number") from None
            for file in (model, prop):
                if not file.resolve().is_relative_to(root.resolve()):
                    raise UsageError(f"{path}:{line}: {file} lies outside {root}, the folder DVC tracks for the "
                                     "instances (inputs.properties; the workspace without an inputs section)")
                if not file.is_file():
                    raise UsageError(f"{path}:{line}: {file} does not exist")
            if not timeout > 0:
                raise UsageError(f"{path}:{line}: timeout must be positive")
            rows.append((model, prop, timeout))
    if not rows:
        raise UsageError(f"{path}: lists no instances")
    return rows


def write_claims(ws: Workspace, params, data, folder: Path) -> tuple[int, str]:
    """One VNNLIB property per certified test sample; returns how many and where (or why none)."""
    if not params.properties.claims:
        return 0, "not written: properties.claims is false"
    if params.threat.norm != "linf":
        return 0, f"not written: VNNLIB input sets are boxes; the threat is {params.threat.norm}"
    if not ws.certify_samples.is_file():
        raise UsageError(f"missing {ws.certify_samples}: run `robustgate certify` first")
    samples = [json.loads(line) for line in ws.certify_samples.read_text(encoding="utf-8").splitlines() if line]
    certified = [s for s in samples if any(v is True for k, v in s.items() if k.endswith("_verified"))]
    x = data.x["test"]
    lower, upper = (_per_feature(bound, x.shape[1:]) for bound in (data.lower, data.upper))
    to_file = _file_layout(params)
    lines = []
    for sample in certified[: params.properties.max_claims]:
        index, label = int(sample["index"]), int(sample["label"])
        methods = ", ".join(k[: -len("_verified")] for k, v in sample.items() if k.endswith("_verified") and v is True)
        text = vnnlib.robustness_property(
            to_file(x[index]), params.threat.epsilon, to_file(lower), to_file(upper), label, data.num_classes,
            comment=f"robustgate claim: test sample {index} (label {label}) is robust at L-inf eps "
                    f"{params.threat.epsilon}, verified by {methods}; unsat means the claim holds")
        name = f"sample_{index:05d}.vnnlib"
        write_text(folder / name, text)
        lines.append(f"../../../models/model.onnx,{name},{params.properties.timeout_s}")
    write_text(folder / "instances.csv", "\n".join(lines) + ("\n" if lines else ""))
    return len(lines), "artifacts/properties/claims (instances.csv lists them against models/model.onnx)"


def _per_feature(bound, shape) -> np.ndarray:
    bound = np.asarray(bound, dtype=np.float64)
    return np.full(shape, float(bound.reshape(-1)[0])) if bound.size == 1 else bound.reshape(shape)


def _file_layout(params):
    layout = params.model.layout if params.model.supplied else "nchw"
    if layout == "nhwc":
        return lambda a: np.transpose(np.asarray(a), (1, 2, 0))
    return lambda a: np.asarray(a)


def _shown(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
