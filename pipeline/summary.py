"""`robustgate summary`: the headline figures of the last run in about ten lines.

`dvc metrics show` prints every figure (hundreds of columns); a reviewer first wants the
verdict, the data, clean and robust accuracy with intervals, the verified and smoothed
figures, the diagnostic figures and the triggering conditions when they ran, and the export
check. Everything else stays in metrics/*.json, `dvc metrics show` and the report. Every
metrics file follows the typed schema (pipeline/results.py, schema_version 3): an accuracy is
`{status: ok, value, ci, n, ...}` or `{status: not_applicable | not_run, reason}`.
"""
from __future__ import annotations

import json
from typing import Optional

from pipeline.workspace import Workspace

STAGES = ("prepare", "train", "attack", "certify", "smooth", "clinical", "conditions", "export", "gate", "register")


def _load(ws: Workspace) -> dict[str, dict]:
    out = {}
    for stage in STAGES:
        path = ws.metrics(stage)
        if path.is_file():
            out[stage] = json.loads(path.read_text(encoding="utf-8"))
    return out


def accuracy(figure: Optional[dict]) -> Optional[str]:
    """`0.912 [0.880, 0.940] n=450` for a typed Accuracy; None when absent or not applicable."""
    if not isinstance(figure, dict) or figure.get("status") != "ok":
        return None
    return f"{figure['value']:.3f} [{figure['ci'][0]:.3f}, {figure['ci'][1]:.3f}] n={figure['n']}"


def _clinical(clinical: dict) -> list[str]:
    """Robust and verified sensitivity of the positive class with their intervals, and ECE."""
    p, calibration = clinical["positive"], clinical.get("calibration")
    line = (f"clinical     “{clinical['positive_class']}”: robust sensitivity "
            f"{accuracy(p['robust_sensitivity']) or p['robust_sensitivity'].get('reason')} (upper bound), verified "
            f"{accuracy(p['verified_sensitivity']) or p['verified_sensitivity'].get('reason')} (lower bound)")
    lines = [line]
    if calibration:
        low, high = calibration["ece_ci"]
        lines.append(f"calibration  ECE {calibration['ece']:.3f} [{low:.3f}, {high:.3f}] n={calibration['n']}"
                     + (f"; smallest subgroup n={clinical['smallest_subgroup_n']}"
                        if clinical.get("smallest_subgroup_n") is not None else ""))
    return lines


def _conditions(conditions: dict) -> Optional[str]:
    """One line: per condition, robust (search) / certified accuracy, and the smoothed classifier's
    probabilistic certificate where smoothing over the parameter ran."""
    records = {name: r for name, r in conditions.items() if isinstance(r, dict) and "robust_accuracy" in r}
    if not records:
        return None
    parts = []
    for name, record in records.items():
        certified = record["certified_accuracy"]
        shown = f"{certified['value']:.3f}" if certified.get("status") == "ok" else "n/a"
        smoothed = (record.get("smoothed") or {}).get("certified_accuracy") or {}
        extra = f" (smoothed classifier {smoothed['value']:.3f})" if smoothed.get("status") == "ok" else ""
        parts.append(f"{name} {record['robust_accuracy']['value']:.3f}/{shown}{extra}")
    return "conditions   robust/certified: " + ", ".join(parts)


def headline(metrics: dict[str, dict]) -> list[str]:
    """The lines `robustgate summary` prints, in reading order."""
    lines = []
    gate = metrics.get("gate")
    if gate is not None:
        failed = ", ".join(gate.get("blocking_failures") or []) or "none"
        lines.append(f"verdict      {'PASSED' if gate.get('passed') else 'FAILED'} under {gate.get('policy')} "
                     f"(blocking failures: {failed})")
    prep = metrics.get("prepare")
    if prep is not None:
        samples = prep.get("samples", {})
        lines.append(f"data         {prep['dataset_name']}: {prep.get('num_classes')} classes, shape {prep.get('input_shape')}, "
                     f"train/val/test {samples.get('train')}/{samples.get('val')}/{samples.get('test')}, "
                     f"fingerprint {str(prep.get('fingerprint'))[:12]}")
    train = metrics.get("train")
    if train is not None:
        lines.append(f"training     {train.get('method')}, best epoch {train.get('best_epoch')}/{train.get('epochs')}, "
                     f"{float(train.get('seconds') or 0):.0f}s")
    attack = metrics.get("attack")
    if attack is not None:
        lines.append(f"threat       {attack['threat']['norm']} ε = {attack['threat']['epsilon']}")
        lines.append(f"clean        {accuracy(attack['clean_accuracy'])}")
        lines.append(f"robust       {accuracy(attack['robust_accuracy'])} (upper bound: worst of "
                     f"{', '.join(attack['attacks'])})")
        if attack.get("masking_failed"):
            lines.append(f"masking      FAILED checks: {', '.join(attack['masking_failed'])}")
    certify = metrics.get("certify")
    if certify is not None:
        parts = [f"{m} {accuracy(a)}" for m, a in (certify.get("verified_accuracy") or {}).items() if accuracy(a)]
        lines.append("verified     " + ("; ".join(parts) if parts else f"not applicable ({certify.get('reason', '-')})"))
    smooth = metrics.get("smooth")
    if smooth is not None and smooth.get("status") == "ok":
        shown = ", ".join(f"r={r}: {a['value']:.3f}" for r, a in list(smooth["certified_accuracy"].items())[:4]
                          if a.get("status") == "ok")
        lines.append(f"smoothed     σ={smooth.get('sigma')}: {shown}")
    clinical = metrics.get("clinical")
    if clinical is not None and clinical.get("status") == "ok":
        lines += _clinical(clinical)
    conditions = _conditions(metrics.get("conditions") or {})
    if conditions:
        lines.append(conditions)
    export = metrics.get("export")
    if export is not None:
        lines.append(f"onnx         max |Δlogit| {export['max_abs_diff']:.2e}, "
                     f"sha256 {str(export.get('onnx_sha256'))[:12]}")
    register = metrics.get("register")
    if register is not None:
        lines.append(f"registry     {register.get('model_name')} version {register.get('version')}"
                     f"{' approved' if register.get('approved') else ' (not approved)'}")
    return lines


def summary(ws: Workspace) -> int:
    metrics = _load(ws)
    if not metrics:
        print("summary: no metrics/*.json yet: run `dvc repro` (or the stages) first")
        return 0
    for line in headline(metrics):
        print(line)
    print("all figures: metrics/*.json, `dvc metrics show`, reports/build/report.html")
    return 0
