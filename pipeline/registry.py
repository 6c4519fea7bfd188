"""MLflow model registry: log the evidence, register the ONNX model, move aliases.

`approved` moves only for a passed verdict whose pinned hashes still match the
files; the previous holder stays recorded so a rollback is one alias move.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CANDIDATE, APPROVED = "candidate", "approved"


@dataclass(frozen=True)
class Registration:
    run_id: str
    model_name: str
    version: str
    approved: bool
    previous_approved: Optional[str]


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def flatten(tree: dict) -> dict:
    out: dict = {}
    _flatten("", tree, out)
    return out


@contextmanager
def tracking(tracking_uri: str):
    """Point the fluent MLflow API at `tracking_uri` for a block, then restore the process state
    (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to the environment)."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets the variable again


def register(
    tracking_uri: str,
    experiment: str,
    model_name: str,
    params: dict,
    metrics: dict[str, dict],
    onnx_path: Path,
    artifacts: list[Path],
    tags: dict[str, str],
    approve: bool,
    input_example,
    artifact_root: Optional[Path] = None,
) -> Registration:
    with tracking(tracking_uri):
        return _register(tracking_uri, experiment, model_name, params, metrics, onnx_path, artifacts, tags,
                         approve, input_example, artifact_root)


def _register(tracking_uri, experiment, model_name, params, metrics, onnx_path, artifacts, tags, approve,
              input_example, artifact_root) -> Registration:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = artifact_root.as_uri() if artifact_root is not None else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    numeric = {k: float(v) for k, v in flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        mlflow.log_metrics(numeric)
        mlflow.set_tags(tags)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="evidence")
        model = onnx.load(str(onnx_path))
        from pipeline.onnx_export import onnx_logits

        signature = infer_signature(input_example, onnx_logits(onnx_path, input_example))
        info = mlflow.onnx.log_model(
            model, name="model", signature=signature, input_example=input_example,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    previous = approved_version(tracking_uri, model_name)
    client.set_registered_model_alias(model_name, CANDIDATE, version.version)
    if approve:
        if previous is not None and previous != str(version.version):
            client.set_model_version_tag(model_name, version.version, "previous_approved", str(previous))
        client.set_registered_model_alias(model_name, APPROVED, version.version)
    return Registration(run.info.run_id, model_name, str(version.version), approve, previous)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def approved_version(tracking_uri: str, model_name: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(tracking_uri).get_model_version_by_alias(model_name, APPROVED).version)
    except MlflowException:
        return None


def rollback(tracking_uri: str, model_name: str) -> tuple[str, str]:
    """Move `approved` to the version it replaced; returns (from, to)."""
    client = _client(tracking_uri)
    current = approved_version(tracking_uri, model_name)
    if current is None:
        raise LookupError(f"model {model_name!r} has no version with alias {APPROVED!r}")
    previous = client.get_model_version(model_name, current).tags.get("previous_approved")
    if not previous:
        raise LookupError(f"version {current} of {model_name!r} replaced no earlier approved version")
    client.set_registered_model_alias(model_name, APPROVED, previous)
    client.set_model_version_tag(model_name, current, "rolled_back_to", previous)
    return current, previous


def versions(tracking_uri: str, model_name: str) -> list[dict]:
    """Every version with its aliases and the evidence tags, newest first."""
    client = _client(tracking_uri)
    found = client.search_model_versions(f"name = '{model_name}'")
    aliases: dict[str, list[str]] = {}
    for alias in (CANDIDATE, APPROVED):
        holder = None
        try:
            holder = str(client.get_model_version_by_alias(model_name, alias).version)
        except Exception:  # alias not set
            holder = None
        if holder is not None:
            aliases.setdefault(holder, []).append(alias)
    rows = []
    for version in sorted(found, key=lambda v: int(v.version), reverse=True):
        tags = version.tags or {}
        rows.append({
            "version": str(version.version),
            "aliases": aliases.get(str(version.version), []),
            "verdict": tags.get("verdict", "?"),
            "onnx_sha256": tags.get("onnx_sha256", "?"),
            "dataset_fingerprint": tags.get("dataset_fingerprint", "?"),
            "git_commit": tags.get("git_commit", "?"),
            "run_id": version.run_id,
        })
    return rows


def approved_metrics(tracking_uri: str, model_name: str) -> Optional[dict]:
    """Version, run and logged metrics of the currently approved model, or None."""
    version = approved_version(tracking_uri, model_name)
    if version is None:
        return None
    client = _client(tracking_uri)
    run_id = client.get_model_version(model_name, version).run_id
    return {"version": version, "run_id": run_id, "metrics": dict(client.get_run(run_id).data.metrics)}
