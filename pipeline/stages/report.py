"""Stage `report`: the audit report as one self-contained HTML file and a reproducible PDF,
with `evidence.json` (every figure and its source file) and `manifest.json` (SHA-256 of
every artifact, optionally Ed25519-signed).

The verdict shown is the policy evaluated on the same metrics the gate reads; the gate
stage that follows is what enforces it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import numpy as np

from pipeline import __version__, claims
from pipeline.evidence import artifact_paths, collect_metrics, hash_artifacts, model_hashes, traceability
from pipeline.io import atomic_write, confine, npz_member, read_json, write_json, write_text
from pipeline.manifest import build_manifest, canonical_bytes, sign
from pipeline.plots import (accuracy_bars, adversarial_gallery, clinical_plots, condition_gallery, condition_heat_map,
                            epsilon_curve, training_curves)
from pipeline.policy import evaluate, load_policy
from pipeline.registry import flatten
from pipeline.results import KIND_MEANING
from pipeline.workspace import Workspace

# Headline figures compared with the approved model, as MLflow logs them (flattened metric paths).
HEADLINE = ("attack.clean_accuracy.value", "attack.robust_accuracy.value", "certify.verified_accuracy.ibp.value",
            "certify.verified_accuracy.crown.value", "certify.verified_accuracy.any.value", "export.max_abs_diff")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_date_epoch(ws: Workspace) -> int:
    """The report's date: SOURCE_DATE_EPOCH when set, else the commit time, so reruns match."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ws.root, capture_output=True,
                             text=True, check=True).stdout.strip()
        return int(out) if out else 0
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 0


def previous_approved(ws: Workspace, model_name: str) -> dict | None:
    """Headline metrics of the currently approved model in the registry; None only when no
    registry is configured or a registry that answered has no approved version. An unreachable
    or failing registry raises RegistryUnreachable: the report never says "no previous model"
    because it could not ask."""
    from pipeline.registry import approved_metrics, default_tracking_uri, registry_errors

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not (ws.root / "mlflow.db").is_file():
            return None
        uri = default_tracking_uri(ws.root)
    with registry_errors(uri, "reading the approved model for the report"):
        found = approved_metrics(uri, model_name)
    if found is None:
        return None
    return {**found, "headline": {k: found["metrics"].get(k) for k in HEADLINE}}


def gallery(ws: Workspace, count: int = 4) -> str | None:
    """Clean / perturbation / adversarial for the first broken samples, for image data only."""
    with np.load(ws.adversarial, allow_pickle=False) as archive:
        y = archive["y"]
        broken = np.flatnonzero(archive["clean_correct"] & ~archive["robust"])[:count]
        adv_pred = archive["adv_pred"]
    x, x_adv = npz_member(ws.adversarial, "x"), npz_member(ws.adversarial, "x_adv")  # mapped: a few rows are read
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(broken) == 0:
        return None
    return adversarial_gallery(x[broken], x_adv[broken], y[broken], y[broken], adv_pred[broken], count)


def counterexample_gallery(ws: Workspace, count: int = 6) -> str | None:
    """The properties stage's sat counterexamples beside their boxes' centres (image data only)."""
    path = ws.root / "artifacts" / "properties" / "counterexamples.npz"  # properties.COUNTEREXAMPLES
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as found:
        centre, x, before, after = found["centre"], found["x"], found["centre_prediction"], found["prediction"]
    return adversarial_gallery(centre, x, before, before, after, count)


def condition_sections(ws: Workspace, metrics: dict) -> list[dict]:
    """Per condition: its record, the sentences derived from it, its heat map and its failures as images."""
    sections = []
    for name, record in claims.conditions_of(metrics).items():
        images_path = ws.root / "artifacts" / "conditions" / f"{name}.npz"
        failures_png = None
        if record["failures"] and images_path.is_file():
            with np.load(images_path, allow_pickle=False) as images:
                if images["x"].ndim == 4 and images["x"].shape[1] in (1, 3):
                    failures_png = condition_gallery(images["x"], images["x_condition"], images["y"],
                                                     images["prediction"], [f["params"] for f in record["failures"]],
                                                     list(record["axes"]))
        sections.append({
            "name": name, "record": record, "label": claims.CONDITION_LABELS[record["kind"]],
            "scope": claims.condition_scope(record, name, metrics.get("train")), "failures_png": failures_png,
            "heat_png": condition_heat_map(record["heat_map"], f"{name}: accuracy at each grid point"),
        })
    return sections


def evidence_records(ws: Workspace, metrics: dict) -> list[dict]:
    """Every number the report can show, with the file it comes from and that file's hash."""
    records = []
    for stage, values in metrics.items():
        source = ws.metrics(stage)
        source_name = f"metrics/{stage}.json" if source.is_file() else "computed by the report stage (trace)"
        digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
        for key, value in flatten(values).items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                records.append({"figure": f"{stage}.{key}", "value": value, "source": source_name, "source_sha256": digest})
    return records


def build_context(ws: Workspace) -> dict:
    params = ws.params()
    metrics = collect_metrics(ws)
    for stage in ("prepare", "train", "attack", "certify", "export"):
        if stage not in metrics:
            read_json(ws.metrics(stage))  # raises a clear "run the upstream stage" error
    metrics["trace"] = traceability(ws, metrics)
    policy = load_policy(confine(params.gate.policy, ws.root, "gate.policy"))
    verdict = evaluate(policy, metrics)
    history = json.loads(ws.train_plot.read_text(encoding="utf-8")) if ws.train_plot.is_file() else []
    attack, certify = metrics["attack"], metrics["certify"]
    smooth = metrics.get("smooth", {})
    bars = [("clean", attack["clean_accuracy"])]
    bars += [(f"robust: {name} only", a["robust_accuracy"]) for name, a in attack["attacks"].items()
             if a["robust_accuracy"]["status"] == "ok"]
    bars.append(("robust: worst case", attack["robust_accuracy"]))
    bars += [(f"verified: {m}", a) for m, a in certify.get("verified_accuracy", {}).items() if a["status"] == "ok"]
    bars += [(f"smoothing: L2 r = {p['radius']:g}", p["certified_accuracy"]) for p in smooth.get("curve", [])
             if p["radius"] > 0][:2]
    threat = attack["threat"]
    lock = ws.root / "dvc.lock"
    artifacts = hash_artifacts(ws, include_report=False)
    epoch = source_date_epoch(ws)
    current = {k: flatten(metrics).get(k) for k in HEADLINE}
    return {
        "title": params.report.title,
        "profile": params.report.profile,
        "report_id": hashlib.sha256(json.dumps(artifacts, sort_keys=True).encode()).hexdigest()[:16],
        "source_date_epoch": epoch,
        "generated_at": dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "generator": f"robustgate {__version__}",
        "git_commit": ws.git_commit(),
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None,
        "params": params,
        "params_yaml": ws.params_file.read_text(encoding="utf-8"),
        "metrics": metrics,
        "model_meta": json.loads((ws.model_dir / "model.json").read_text(encoding="utf-8")),
        "policy": policy,
        "policy_path": params.gate.policy,
        "verdict": verdict,
        "history": history,
        "curves_png": training_curves(history) if history else None,
        "smooth_png": epsilon_curve(
            [{"epsilon": p["radius"], "robust_accuracy": p["certified_accuracy"]["value"],
              "ci_low": p["certified_accuracy"]["ci"][0], "ci_high": p["certified_accuracy"]["ci"][1]}
             for p in smooth["curve"]], 0.0, "L2 radius (input units)",
            "Randomized smoothing: certified accuracy against radius") if smooth.get("status") == "ok" else None,
        "certify_sweep_png": epsilon_curve(
            [{"epsilon": p["epsilon"], "robust_accuracy": p["verified_accuracy"], "ci_low": p["ci_low"],
              "ci_high": p["ci_high"]} for p in certify["sweep"]["points"]], threat["epsilon"],
            f"ε ({threat['norm']}, input units)", f"Verified accuracy ({certify['sweep']['method']}) against ε")
        if certify.get("sweep") else None,
        "sweep_png": epsilon_curve(attack["sweep"]["points"], threat["epsilon"],
                                   f"ε ({threat['norm']}, input units)", "Robust accuracy against ε")
        if attack.get("sweep") else None,
        "bars_png": accuracy_bars([(label, a["value"], a["ci"]) for label, a in bars]),
        "gallery_png": gallery(ws),
        "counterexamples_png": counterexample_gallery(ws),
        "limitations": claims.limitations(params, metrics),
        "clinical_findings": claims.clinical_findings(metrics),
        "clinical_png": clinical_plots(metrics.get("clinical") or {}),
        "threat_rows": claims.threat_model(metrics),
        "conditions": condition_sections(ws, metrics),
        "conditions_ran": "conditions" in metrics,
        "condition_rows": claims.triggering_conditions(metrics, policy.requirements),
        "model_hashes": model_hashes(metrics),
        "attack_scope": claims.attack_scope(attack),
        "training_selection": claims.training_selection(metrics["train"]),
        **({"supplied_shipping": claims.supplied_shipping(metrics["train"]),
            "import_parity": claims.import_parity(metrics["train"])} if metrics["train"].get("source") else {}),
        "kind_meaning": KIND_MEANING,
        "previous": previous_approved(ws, params.registry.model_name),
        "current_headline": current,
        "artifacts": artifacts,
        "versions": {
            "python": sys.version.split()[0],
            **{pkg: _version(pkg) for pkg in
               ("torch", "numpy", "onnx", "onnxruntime", "auto-LiRPA", "mlflow", "dvc", "weasyprint")},
        },
        "hardware": f"{platform.machine()} {platform.system()} ({os.cpu_count()} CPUs)",
        "runtime_used": claims.runtime_used(metrics),
    }


def signing_key(ws: Workspace, params) -> bytes | None:
    """The validated Ed25519 key (ROBUSTGATE_SIGNING_KEY, else report.signing_key), or None; a bad
    key is a UsageError, so call this before writing anything."""
    from pipeline.manifest import configured_signing_key

    return configured_signing_key(ws.root, params)


def main(ws: Workspace) -> int:
    from pipeline.report import render_html, render_pdf

    params = ws.params()
    key = signing_key(ws, params)  # a bad key stops the stage before any report file is replaced
    context = build_context(ws)
    html = render_html(ws.templates, context, params.report.profile)
    build = ws.report_html.parent
    write_text(ws.report_html, html)
    atomic_write(build / "report.pdf", lambda tmp: render_pdf(
        html, tmp, "robustgate-" + context["report_id"], context["source_date_epoch"]))
    write_json(build / "evidence.json", {
        "schema_version": 1,
        "report_id": context["report_id"],
        "verdict": {"passed": context["verdict"].passed, "policy": params.gate.policy},
        "figures": evidence_records(ws, context["metrics"]),
    })
    files = {
        **artifact_paths(ws, include_report=True),
        "reports/build/report.pdf": build / "report.pdf",
        "reports/build/evidence.json": build / "evidence.json",
        "params.yaml": ws.params_file,
        params.gate.policy: confine(params.gate.policy, ws.root, "gate.policy"),
    }
    manifest = build_manifest(ws.root, files, {
        "report_id": context["report_id"],
        "dataset_fingerprint": context["metrics"]["prepare"]["fingerprint"],
        "git_commit": context["git_commit"],
        "generator": context["generator"],
        "signed": key is not None,  # verify fails when the signature is later deleted
    })
    manifest_bytes = canonical_bytes(manifest)
    atomic_write(build / "manifest.json", lambda tmp: tmp.write_bytes(manifest_bytes))
    signature_path = build / "manifest.json.sig"
    if key is not None:
        write_json(signature_path, sign(manifest_bytes, key))
    else:
        signature_path.unlink(missing_ok=True)
    verdict = "PASS" if context["verdict"].passed else "FAIL"
    signed = " (manifest signed)" if key is not None else ""
    print(f"report: {ws.report_html.relative_to(ws.root)} and report.pdf, profile {params.report.profile}, "
          f"policy verdict {verdict}; {len(manifest['artifacts'])} artifacts in manifest.json{signed}")
    return 0
