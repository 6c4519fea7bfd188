"""Stage `register`: log the run to MLflow and register the ONNX model.

It re-checks what the gate decided: a failed verdict, or any artifact whose
SHA-256 differs from the one pinned in `metrics/gate.json`, keeps `approved`
where it is.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline.errors import IntegrityMismatch, RegistryUnreachable
from pipeline.evidence import collect_metrics, hash_artifacts
from pipeline.io import read_json, sha256_file, write_json
from pipeline.registry import default_tracking_uri, register
from pipeline.workspace import SCHEMA_VERSION, Workspace


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, not after minutes of client retries, when a tracking server is down."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RegistryUnreachable(
            f"MLflow tracking server {_redact(tracking_uri)} is unreachable ({reason}); nothing was registered "
            "and every local artifact is kept: start the server or unset MLFLOW_TRACKING_URI, then re-run"
        ) from None


def _redact(uri: str) -> str:
    """Drop credentials from a URI before it is printed or stored."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.split('@')[-1]}" if sep else uri


def tampered(pinned: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(name for name, digest in pinned.items() if current.get(name) != digest)


def main(ws: Workspace) -> int:
    params = ws.params()
    gate = read_json(ws.metrics("gate"))
    changed = tampered(gate["artifacts"], hash_artifacts(ws))
    if changed:
        raise IntegrityMismatch(f"refusing to register: changed since the gate ran: {', '.join(changed)}; re-run dvc repro")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ws.root)
    local_store = tracking_uri.startswith("sqlite:")
    check_reachable(tracking_uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    metrics = collect_metrics(ws, ("prepare", "train", "attack", "certify", "smooth", "export", "gate"))
    onnx_sha = sha256_file(ws.onnx)
    x_example = np.load(ws.prepared, allow_pickle=False)["x_test"][:2]
    tags = {
        "onnx_sha256": onnx_sha,
        "evidence_sha256": sha256_file(ws.metrics("gate")),
        "git_commit": gate.get("git_commit", ws.git_commit()),
        "dataset_fingerprint": metrics["prepare"]["fingerprint"],
        "policy": gate["policy"],
        "verdict": "passed" if gate["passed"] else "failed",
    }
    build = ws.report_html.parent
    evidence = [ws.report_html, build / "report.pdf", build / "evidence.json", build / "manifest.json",
                build / "manifest.json.sig", ws.metrics("gate"), *[ws.metrics(s) for s in ("attack", "certify", "export")]]
    try:
        result = register(
            tracking_uri, params.registry.experiment, params.registry.model_name,
            params.model_dump(mode="json", by_alias=True), metrics, ws.onnx,
            [p for p in evidence if p.is_file()], tags, approve=bool(gate["passed"]), input_example=x_example,
            artifact_root=ws.root / "mlruns" if local_store else None,
        )
    except Exception as error:  # MLflow raises many types for an unreachable or refusing store
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RegistryUnreachable(f"MLflow at {_redact(tracking_uri)} failed: {first}; local artifacts are untouched") from None
    write_json(ws.metrics("register"), {
        "schema_version": SCHEMA_VERSION,
        "model_name": result.model_name,
        "version": result.version,
        "run_id": result.run_id,
        "approved": result.approved,
        "previous_approved": result.previous_approved,
        "tracking_uri": _redact(tracking_uri),
        "onnx_sha256": onnx_sha,
    })
    aliases = "candidate, approved" if result.approved else "candidate (approved unchanged)"
    print(f"register: {result.model_name} version {result.version} -> {aliases}; run {result.run_id}")
    return 0
