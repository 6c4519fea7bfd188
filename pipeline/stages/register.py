"""Stage `register`: log the run to MLflow and register the ONNX model.

It does not take `metrics/gate.json` at its word: it re-evaluates the policy on the
metrics (`pipeline.verdict.decide`, the gate's own function) and refuses, before
touching the registry, when the recorded verdict disagrees, the policy changed, a
pinned hash differs from its file, the export stage checked another ONNX file, the
report's manifest lists other hashes, or a configured signature is missing or wrong.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline import results
from pipeline.errors import IntegrityMismatch, RegistryUnreachable
from pipeline.io import sha256_file, write_json
from pipeline.manifest import configured_signing_key
from pipeline.registry import check_reachable, default_tracking_uri, redact, register
from pipeline.verdict import decide, file_problems, gate_record_path, public_key_of, read_record, verdict_problems
from pipeline.workspace import Workspace


def checked_decision(ws: Workspace, params):
    """The verdict re-derived from the files, after every check that gate.json follows from them."""
    key = configured_signing_key(ws.root, params)
    record, problems = read_record(gate_record_path(ws))
    if record is None:
        raise IntegrityMismatch(f"refusing to register: {problems[0]}")
    problems = file_problems(ws, record, public_key_of(key), signature_required=key is not None)
    decision = None if problems else decide(ws)
    problems = problems or verdict_problems(record, decision)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityMismatch(f"refusing to register: {problems[0]}{more}; re-run dvc repro")
    return record, decision


def shown_uri(tracking_uri: str, ws: Workspace) -> str:
    """The tracking URI as the committed record shows it: no credentials, no machine-specific path."""
    if tracking_uri == default_tracking_uri(ws.root):
        return "sqlite:///mlflow.db (in the workspace)"
    return redact(tracking_uri)


def main(ws: Workspace) -> int:
    params = ws.params()
    gate, decision = checked_decision(ws, params)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ws.root)
    local_store = tracking_uri.startswith("sqlite:")
    check_reachable(tracking_uri)
    metrics = {**{k: v for k, v in decision.metrics.items() if k != "trace"},
               "gate": {"passed": decision.passed, "trace": decision.metrics["trace"]}}
    onnx_sha = sha256_file(ws.onnx)
    x_example = np.load(ws.prepared, allow_pickle=False)["x_test"][:2]
    tags = {
        "onnx_sha256": onnx_sha,
        "evidence_sha256": sha256_file(gate_record_path(ws)),
        "git_commit": str(gate.get("git_commit", ws.git_commit())),
        "dataset_fingerprint": str(decision.metrics.get("prepare", {}).get("fingerprint", "?")),
        "policy": decision.policy_file,
        "policy_sha256": decision.policy_sha256,
        "verdict": "passed" if decision.passed else "failed",
    }
    build = ws.report_html.parent
    evidence = [ws.report_html, build / "report.pdf", build / "evidence.json", build / "manifest.json",
                build / "manifest.json.sig", gate_record_path(ws), gate_record_path(ws).with_name("gate.json.sig"),
                *[ws.metrics(s) for s in ("attack", "certify", "export")]]
    try:
        result = register(
            tracking_uri, params.registry.experiment, params.registry.model_name,
            params.model_dump(mode="json", by_alias=True), metrics, ws.onnx,
            [p for p in evidence if p.is_file()], tags, approve=decision.passed, input_example=x_example,
            artifact_root=ws.root / "mlruns" if local_store else None,
        )
    except (IntegrityMismatch, RegistryUnreachable):
        raise
    except Exception as error:  # MLflow raises many types for an unreachable or refusing store
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RegistryUnreachable(f"MLflow at {redact(tracking_uri)} failed: {first}; local artifacts are untouched") from None
    write_json(ws.metrics("register"), results.dump(results.RegisterResult(
        model_name=result.model_name, version=result.version, run_id=result.run_id, approved=result.approved,
        previous_approved=result.previous_approved, tracking_uri=shown_uri(tracking_uri, ws), onnx_sha256=onnx_sha,
        registered_onnx_sha256=result.registered_onnx_sha256)))
    aliases = "candidate, approved" if result.approved else "candidate (approved unchanged)"
    print(f"register: {result.model_name} version {result.version} -> {aliases}; run {result.run_id}")
    return 0
