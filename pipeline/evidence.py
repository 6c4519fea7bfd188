"""Collect the stages' metrics and hash the artifacts the evidence speaks of."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import results
from pipeline.io import sha256_file
from pipeline.workspace import Workspace

METRIC_STAGES = ("prepare", "train", "attack", "certify", "smooth", "conditions", "export", "properties",
                 "clinical")


def collect_metrics(ws: Workspace, stages=METRIC_STAGES) -> dict[str, dict]:
    """Every stage's metrics that exists, each validated against its results schema; absent stages
    are simply absent (the policy fails them), a malformed file is refused."""
    return {stage: results.load(stage, ws.metrics(stage)) for stage in stages if ws.metrics(stage).is_file()}


def model_hashes(metrics: dict[str, dict]) -> dict[str, str]:
    """The checkpoint SHA-256 each piece of evidence speaks of, by stage."""
    return {stage: values["model_sha256"] for stage, values in metrics.items()
            if isinstance(values, dict) and values.get("model_sha256")}


def artifact_paths(ws: Workspace, include_report: bool) -> dict[str, Path]:
    """Every file the evidence speaks of, by workspace-relative path: the pipeline's outputs and
    the user's inputs that shaped them (data under data.path, the model factory's module, the
    policy), so that `robustgate verify` fails when any of them changes."""
    from pipeline.inputs import user_inputs

    paths = {
        **user_inputs(ws.params(), ws.root),
        "data/prepared/data.npz": ws.prepared,
        "models/model.pt": ws.model_dir / "model.pt",
        "models/model.json": ws.model_dir / "model.json",
        "models/model.onnx": ws.onnx,
        "artifacts/attack/adversarial.npz": ws.adversarial,
        **{f"metrics/{s}.json": ws.metrics(s) for s in METRIC_STAGES},
    }
    if include_report:
        paths["reports/build/report.html"] = ws.report_html
        paths["reports/build/report.pdf"] = ws.report_html.with_name("report.pdf")
    return paths


def hash_artifacts(ws: Workspace, include_report: bool = True) -> dict[str, str]:
    """SHA-256 of each artifact that exists, keyed by its workspace-relative path."""
    return {name: sha256_file(path) for name, path in artifact_paths(ws, include_report).items() if path.is_file()}


def traceability(ws: Workspace, metrics: dict[str, dict]) -> dict[str, float]:
    """Checks that every artifact speaks of the same data and model, as 0/1 metrics for policies."""
    import onnx

    from pipeline.data.store import load_prepared

    fingerprints = {metrics.get(s, {}).get("dataset_fingerprint") for s in ("train", "attack", "certify")}
    fingerprints.add(metrics.get("prepare", {}).get("fingerprint"))
    model_json = ws.model_dir / "model.json"
    if model_json.is_file():
        fingerprints.add(json.loads(model_json.read_text(encoding="utf-8")).get("dataset_fingerprint"))
    onnx_matches = 0.0
    if ws.onnx.is_file():
        meta = {p.key: p.value for p in onnx.load(str(ws.onnx), load_external_data=False).metadata_props}
        if metrics.get("train", {}).get("source") is None:  # a supplied file ships unchanged, without our metadata
            fingerprints.add(meta.get("robustgate.dataset_fingerprint"))
        onnx_matches = float(metrics.get("export", {}).get("onnx_sha256") == sha256_file(ws.onnx))
    disjoint = 0.0
    if ws.prepared.is_file():
        idx = load_prepared(ws.prepared).indices
        sets = [set(idx[s].tolist()) for s in ("train", "val", "test")]
        disjoint = float(not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]))
    commit = ws.git_commit()
    checkpoint = sha256_file(ws.checkpoint) if ws.checkpoint.is_file() else None
    hashes = set(model_hashes(metrics).values())
    return {
        "model_hash_consistent": float(checkpoint is not None and hashes == {checkpoint}),
        "dataset_fingerprint_consistent": float(len(fingerprints) == 1 and None not in fingerprints),
        "onnx_hash_matches": onnx_matches,
        "splits_disjoint": disjoint,
        "git_clean": float(commit != "unknown" and not commit.endswith("+dirty")),
    }
