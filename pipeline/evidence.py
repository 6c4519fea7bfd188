"""Collect the stages' metrics and hash the artifacts the evidence speaks of."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import sha256_file
from pipeline.workspace import Workspace

METRIC_STAGES = ("prepare", "train", "attack", "certify", "export")


def collect_metrics(ws: Workspace, stages=METRIC_STAGES) -> dict[str, dict]:
    """Every stage's metrics that exists; absent stages are simply absent (the policy fails them)."""
    metrics = {}
    for stage in stages:
        path = ws.metrics(stage)
        if path.is_file():
            metrics[stage] = json.loads(path.read_text(encoding="utf-8"))
    return metrics


def artifact_paths(ws: Workspace, include_report: bool) -> dict[str, Path]:
    paths = {
        "data/prepared/data.npz": ws.prepared,
        "models/model.pt": ws.model_dir / "model.pt",
        "models/model.json": ws.model_dir / "model.json",
        "models/model.onnx": ws.onnx,
        "artifacts/attack/adversarial.npz": ws.adversarial,
        **{f"metrics/{s}.json": ws.metrics(s) for s in METRIC_STAGES},
    }
    if include_report:
        paths["reports/build/report.html"] = ws.report_html
    return paths


def hash_artifacts(ws: Workspace, include_report: bool = True) -> dict[str, str]:
    """SHA-256 of each artifact that exists, keyed by its workspace-relative path."""
    return {name: sha256_file(path) for name, path in artifact_paths(ws, include_report).items() if path.is_file()}
