"""Stage `report`: one self-contained HTML file with every figure, its interval and its source.

The verdict shown is the policy evaluated on the same metrics the gate reads;
the gate stage that follows is what enforces it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import sys
from importlib import metadata

from pipeline import __version__
from pipeline.evidence import collect_metrics, hash_artifacts, traceability
from pipeline.io import confine, read_json, write_text
from pipeline.plots import accuracy_bars, training_curves
from pipeline.policy import evaluate, load_policy
from pipeline.workspace import Workspace


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _generated_at() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def limitations(params, metrics: dict) -> list[str]:
    """Residual risk generated from what was run, what was not, and the params."""
    notes = []
    attack = metrics.get("attack", {})
    names = ", ".join(attack.get("attacks", {})) or "none"
    notes.append(
        f"Robust accuracy is an upper bound: it holds only against the attacks run ({names}). "
        "Stronger or adaptive attacks (APGD, Square, attacks tailored to this model) were not run and may lower it."
    )
    certify = metrics.get("certify", {})
    if certify.get("status") == "not_applicable":
        notes.append(f"Formal verification was not applicable: {certify.get('reason')}.")
    else:
        notes.append(
            "Verified accuracy is a lower bound computed in float32 bound propagation; margins within "
            f"{params.certify.tolerance:g} of zero are not counted as verified."
        )
    if params.threat.norm == "l2":
        notes.append("For L2 certification the data-domain box is not used, which can only loosen the bounds.")
    n = attack.get("n")
    if n:
        lo, hi = attack.get("robust_accuracy_ci", [0, 1])
        notes.append(f"All figures come from {n} test samples; the 95% interval on robust accuracy is "
                     f"{100 * (hi - lo):.1f} points wide.")
    notes.append(f"Only the {params.threat.norm} threat model with ε = {params.threat.epsilon:g} was evaluated; "
                 "other perturbation types (rotations, noise, weather, sensor faults) are not covered.")
    notes.append("Randomized smoothing was not run in this pipeline configuration.")
    for field in ("intended_purpose", "input_domain", "out_of_scope_use"):
        if getattr(params.report, field) is None:
            notes.append(f"report.{field} is not stated in params.yaml: the reviewer must supply it.")
    return notes


def build_context(ws: Workspace) -> dict:
    params = ws.params()
    metrics = collect_metrics(ws)
    metrics["trace"] = traceability(ws, metrics)
    for stage in ("prepare", "train", "attack", "certify", "export"):
        if stage not in metrics:
            read_json(ws.metrics(stage))  # raises a clear "run the upstream stage" error
    policy_path = confine(params.gate.policy, ws.root, "gate.policy")
    policy = load_policy(policy_path)
    verdict = evaluate(policy, metrics)
    history = json.loads(ws.train_plot.read_text(encoding="utf-8")) if ws.train_plot.is_file() else []
    attack, certify = metrics["attack"], metrics["certify"]
    bars = [("clean", attack["clean_accuracy"], attack["clean_accuracy_ci"])]
    bars += [(f"robust: {name} only", a["robust_accuracy"]["value"], a["robust_accuracy"]["ci"])
             for name, a in attack["attacks"].items()]
    bars.append(("robust: worst case", attack["robust_accuracy"], attack["robust_accuracy_ci"]))
    bars += [(f"verified: {m}", d["value"], d["ci"]) for m, d in certify.get("methods", {}).items()]
    lock = ws.root / "dvc.lock"
    model_meta = json.loads((ws.model_dir / "model.json").read_text(encoding="utf-8"))
    return {
        "title": params.report.title,
        "report_id": hashlib.sha256(json.dumps(hash_artifacts(ws, include_report=False), sort_keys=True)
                                    .encode()).hexdigest()[:16],
        "generated_at": _generated_at(),
        "generator": f"robustgate {__version__}",
        "git_commit": ws.git_commit(),
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None,
        "params": params,
        "params_yaml": ws.params_file.read_text(encoding="utf-8"),
        "metrics": metrics,
        "model_meta": model_meta,
        "policy": policy,
        "policy_path": params.gate.policy,
        "verdict": verdict,
        "history": history,
        "curves_png": training_curves(history) if history else None,
        "bars_png": accuracy_bars(bars),
        "limitations": limitations(params, metrics),
        "artifacts": hash_artifacts(ws, include_report=False),
        "versions": {
            "python": sys.version.split()[0],
            **{pkg: _version(pkg) for pkg in ("torch", "numpy", "onnx", "onnxruntime", "auto-LiRPA", "mlflow", "dvc")},
        },
        "hardware": f"{platform.machine()} {platform.system()} ({os.cpu_count()} CPUs)",
    }


def main(ws: Workspace) -> int:
    from pipeline.report import render_html

    context = build_context(ws)
    write_text(ws.report_html, render_html(ws.templates, context))
    verdict = "PASS" if context["verdict"].passed else "FAIL"
    print(f"report: {ws.report_html.relative_to(ws.root)} (policy verdict {verdict})")
    return 0
