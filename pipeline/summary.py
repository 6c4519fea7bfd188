"""`robustgate summary`: the headline figures of the last run in about ten lines.

`dvc metrics show` prints every figure (hundreds of columns); a reviewer first wants the
verdict, the data, clean and robust accuracy with intervals, the verified and smoothed
figures and the export check. Everything else stays in metrics/*.json, `dvc metrics show`
and the report. Reads both metric shapes: a bare number with a sibling `<key>_ci`, or an
object `{value, ci, n, ...}`.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from pipeline.workspace import Workspace

STAGES = ("prepare", "train", "attack", "certify", "smooth", "export", "gate", "register")


def _load(ws: Workspace) -> dict[str, dict]:
    out = {}
    for stage in STAGES:
        path = ws.metrics(stage)
        if path.is_file():
            out[stage] = json.loads(path.read_text(encoding="utf-8"))
    return out


def accuracy(section: dict, key: str, sub: Optional[str] = None) -> Optional[str]:
    """`0.912 [0.88, 0.94] n=450` from either metric shape; None when absent or not applicable."""
    value = section.get(key)
    ci = section.get(f"{key}_ci")
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
        ci = ci.get(sub) if isinstance(ci, dict) else None
    n = section.get("n")
    if isinstance(value, dict):
        value, ci, n = value.get("value"), value.get("ci", ci), value.get("n", n)
    if not isinstance(value, (int, float)):
        return None
    text = f"{value:.3f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if n:
        text += f" n={n}"
    return text


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
        name = prep.get("dataset_name", prep.get("dataset"))
        lines.append(f"data         {name}: {prep.get('num_classes')} classes, shape {prep.get('input_shape')}, "
                     f"train/val/test {samples.get('train')}/{samples.get('val')}/{samples.get('test')}, "
                     f"fingerprint {str(prep.get('fingerprint'))[:12]}")
    train = metrics.get("train")
    if train is not None:
        lines.append(f"training     {train.get('method')}, best epoch {train.get('best_epoch')}/{train.get('epochs')}, "
                     f"{float(train.get('seconds') or 0):.0f}s")
    attack = metrics.get("attack")
    if attack is not None:
        threat = attack.get("threat") or attack
        lines.append(f"threat       {threat.get('norm')} ε = {threat.get('epsilon')}")
        lines.append(f"clean        {accuracy(attack, 'clean_accuracy')}")
        lines.append(f"robust       {accuracy(attack, 'robust_accuracy')} (upper bound: worst of "
                     f"{', '.join(attack.get('attacks', {}))})")
        if attack.get("masking_failed"):
            lines.append(f"masking      FAILED checks: {', '.join(attack['masking_failed'])}")
    certify = metrics.get("certify")
    if certify is not None:
        verified = certify.get("verified_accuracy") or {}
        parts = [f"{m} {accuracy(certify, 'verified_accuracy', m)}" for m in verified
                 if accuracy(certify, "verified_accuracy", m)]
        lines.append("verified     " + ("; ".join(parts) if parts else f"not applicable ({certify.get('reason', '-')})"))
    smooth = metrics.get("smooth")
    if smooth is not None and smooth.get("status") == "ok":
        certified = smooth.get("certified_accuracy") or {}
        shown = ", ".join(f"r={r}: {_number(v):.3f}" for r, v in list(certified.items())[:4] if _number(v) is not None)
        lines.append(f"smoothed     σ={smooth.get('sigma')}: {shown}")
    export = metrics.get("export")
    if export is not None:
        lines.append(f"onnx         max |Δlogit| {float(export.get('max_abs_diff', float('nan'))):.2e}, "
                     f"sha256 {str(export.get('onnx_sha256'))[:12]}")
    register = metrics.get("register")
    if register is not None:
        lines.append(f"registry     {register.get('model_name')} version {register.get('version')}"
                     f"{' approved' if register.get('approved') else ' (not approved)'}")
    return lines


def _number(value: Any) -> Optional[float]:
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) else None


def summary(ws: Workspace) -> int:
    metrics = _load(ws)
    if not metrics:
        print("summary: no metrics/*.json yet: run `dvc repro` (or the stages) first")
        return 0
    for line in headline(metrics):
        print(line)
    print("all figures: metrics/*.json, `dvc metrics show`, reports/build/report.html")
    return 0
