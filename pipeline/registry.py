"""MLflow model registry: log the evidence, register the exact ONNX bytes, move aliases.

`approved` moves only for a passed verdict; the previous holder stays recorded on
the new version (`previous_approved`) so a rollback is one alias move. The
read-modify-write of `approved` runs under a lock (a registered model whose
creation is atomic in every MLflow store), so concurrent registrations keep the
promotion chain whole. MLflow keeps no history of alias moves, so every registration,
promotion and rollback appends one event to the promotion log: a tag
`promotion_log.<seq>` on the registered model, written under the same lock with the
next sequence number and never rewritten. An unreachable or failing registry is an
error, never "no approved model".
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import EvidenceError, IntegrityMismatch, RegistryUnreachable, UsageError, first_line
from pipeline.io import sha256_file

CANDIDATE, APPROVED = "candidate", "approved"
LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S, LOCK_STALE_S = 120.0, 300.0
LOG_PREFIX = "promotion_log."


@dataclass(frozen=True)
class Registration:
    run_id: str
    model_name: str
    version: str
    approved: bool
    previous_approved: Optional[str]
    registered_onnx_sha256: str


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def redact(uri: str) -> str:
    """Drop credentials from a URI before it is printed or stored."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.split('@')[-1]}" if sep else uri


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after minutes of client retries, when a tracking server is down."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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
            f"MLflow tracking server {redact(tracking_uri)} is unreachable ({reason}); nothing was read or "
            "registered and every local artifact is kept: start the server or unset MLFLOW_TRACKING_URI, then re-run"
        ) from None



@contextmanager
def registry_errors(tracking_uri: str, doing: str):
    """Any failure of the MLflow client (MlflowException, but also the store's own SQLAlchemy or HTTP
    errors) becomes one RegistryUnreachable line (exit 1), never an empty answer."""
    try:
        yield
    except (EvidenceError, UsageError):
        raise
    except Exception as error:  # noqa: BLE001 (only registry calls run inside)
        raise RegistryUnreachable(f"MLflow at {redact(tracking_uri)} failed while {doing}: "
                                  f"{type(error).__name__}: {first_line(error, 300)}") from None


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


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def _is_absent(error) -> bool:
    """MLflow's way of saying "no such model / alias" (and nothing else)."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


def alias_holder(client, model_name: str, alias: str) -> Optional[str]:
    """The version holding `alias`, None only when the registry says there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as error:
        if _is_absent(error):
            return None
        raise RegistryUnreachable(f"registry refused to read alias {alias!r} of {model_name!r}: "
                                  f"{first_line(error, 300)}") from None


@contextmanager
def promotion_lock(client, model_name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S):
    """Serialise moves of `approved`: creating a registered model is atomic (unique name) in
    every store, so whoever creates `<name>.promotion-lock` holds the lock until it deletes it.
    A lock older than `stale_s` (its holder crashed) is broken."""
    from mlflow.exceptions import MlflowException

    lock, token = model_name + LOCK_SUFFIX, uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": token, "since": str(time.time())},
                                           description="robustgate promotion lock; delete only if its holder died")
            break
        except MlflowException as error:
            if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise RegistryUnreachable(f"registry refused the promotion lock: {first_line(error, 300)}") from None
        try:
            since = float(client.get_registered_model(lock).tags.get("since", "0"))
        except MlflowException:
            continue  # released in between: try again at once
        if time.time() - since > stale_s:
            _delete_quietly(client, lock)
        elif time.monotonic() > deadline:
            raise RegistryUnreachable(f"registered model {lock!r} held for {time.time() - since:.0f}s by another "
                                      "registration; retry later, or delete it if that process died")
        else:
            time.sleep(0.2)
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _delete_quietly(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException:
        pass


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


def _model_directory(onnx_path: Path, input_example, into: Path) -> Path:
    """An MLflow ONNX model directory whose model.onnx is a byte copy of the evaluated file
    (mlflow.onnx re-serialises the proto it is given)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    from pipeline.onnx_export import onnx_logits

    signature = infer_signature(input_example, onnx_logits(onnx_path, input_example))
    directory = into / "model"
    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(directory), signature=signature,
                           input_example=input_example, onnx_execution_providers=["CPUExecutionProvider"])
    shutil.copyfile(onnx_path, directory / "model.onnx")
    return directory


def registered_onnx_sha256(tracking_uri: str, model_name: str, version: str) -> str:
    """SHA-256 of the model.onnx the registry serves for a version (downloaded, then deleted)."""
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # status output stays a table
    with tempfile.TemporaryDirectory() as scratch, tracking(tracking_uri):  # models:/ resolves via the registry URI
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=scratch)
        return sha256_file(Path(local) / "model.onnx")


def _register(tracking_uri, experiment, model_name, params, metrics, onnx_path, artifacts, tags, approve,
              input_example, artifact_root) -> Registration:
    import mlflow

    client = _client(tracking_uri)
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
        with tempfile.TemporaryDirectory() as scratch:
            mlflow.log_artifacts(str(_model_directory(onnx_path, input_example, Path(scratch))), artifact_path="model")
    version = str(mlflow.register_model(f"runs:/{run.info.run_id}/model", model_name, tags=tags).version)
    served = registered_onnx_sha256(tracking_uri, model_name, version)
    client.set_model_version_tag(model_name, version, "registered_onnx_sha256", served)
    if served != tags["onnx_sha256"]:
        raise IntegrityMismatch(f"the registry holds different bytes for version {version} (SHA-256 {served[:16]}..., "
                                f"evaluated {tags['onnx_sha256'][:16]}...); no alias was moved")
    verdict = tags.get("verdict", "?")
    with promotion_lock(client, model_name):
        if verdict == "passed":  # no alias ever points at a version that failed its gate
            client.set_registered_model_alias(model_name, CANDIDATE, version)
        approved_before = alias_holder(client, model_name, APPROVED)
        append_log(client, model_name, "registered", version, verdict=verdict, approved=approved_before,
                   git_commit=tags.get("git_commit", "?"), onnx_sha256=tags.get("onnx_sha256", "?"))
        previous = _move_approved(client, model_name, version) if approve else approved_before
    return Registration(run.info.run_id, model_name, version, approve, previous, served)


def _move_approved(client, model_name: str, version: str) -> Optional[str]:
    """Move `approved` to `version`, recording the version it replaces, and log the move. Caller holds
    the lock; re-read after the write: if another writer got in anyway (a lock broken as stale), fail."""
    verdict = client.get_model_version(model_name, version).tags.get("verdict")
    if verdict != "passed":
        append_log(client, model_name, "refused", version, verdict=str(verdict),
                   approved=alias_holder(client, model_name, APPROVED))
        raise IntegrityMismatch(f"version {version} of {model_name!r} has verdict {verdict!r}; {APPROVED!r} not moved")
    previous = alias_holder(client, model_name, APPROVED)
    _pause_for_tests()
    if previous is not None and previous != version:
        client.set_model_version_tag(model_name, version, "previous_approved", previous)
    client.set_registered_model_alias(model_name, APPROVED, version)
    holder = alias_holder(client, model_name, APPROVED)
    if holder != version:
        raise RegistryUnreachable(f"alias {APPROVED!r} of {model_name!r} moved to version {holder} while version "
                                  f"{version} was being promoted; re-run register")
    append_log(client, model_name, "approved", version, verdict="passed", previous=previous)
    return previous


def append_log(client, model_name: str, event: str, version: str, **detail) -> int:
    """Append one event to the promotion log; the caller holds the promotion lock, so the sequence
    number is the next free one and no two writers share it. Returns the sequence number."""
    existing = client.get_registered_model(model_name).tags or {}
    taken = [int(key[len(LOG_PREFIX):]) for key in existing if key.startswith(LOG_PREFIX)
             and key[len(LOG_PREFIX):].isdigit()]
    seq = max(taken, default=0) + 1
    record = {"seq": seq, "event": event, "version": str(version), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
              time.gmtime()), "host": os.uname().nodename, "pid": os.getpid(),
              **{k: (str(v) if v is not None else None) for k, v in detail.items()}}
    client.set_registered_model_tag(model_name, f"{LOG_PREFIX}{seq:06d}", json.dumps(record, sort_keys=True))
    return seq


def promotion_log(tracking_uri: str, model_name: str) -> list[dict]:
    """Every logged event of `model_name`, oldest first (empty for a model never registered)."""
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    try:
        tags = _client(tracking_uri).get_registered_model(model_name).tags or {}
    except MlflowException as error:
        if _is_absent(error):
            return []
        raise
    events = []
    for key in sorted(k for k in tags if k.startswith(LOG_PREFIX)):
        try:
            events.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            events.append({"seq": int(key[len(LOG_PREFIX):]) if key[len(LOG_PREFIX):].isdigit() else key,
                           "event": "unreadable", "version": "?"})
    return events


def _pause_for_tests() -> None:
    """Widen the read-modify-write window so the concurrency test can show the lock holds."""
    pause = os.environ.get("ROBUSTGATE_PROMOTION_PAUSE_S")
    if pause:
        time.sleep(float(pause))


def approved_version(tracking_uri: str, model_name: str) -> Optional[str]:
    check_reachable(tracking_uri)
    return alias_holder(_client(tracking_uri), model_name, APPROVED)


def rollback(tracking_uri: str, model_name: str) -> tuple[str, str]:
    """Move `approved` to the version it replaced; returns (from, to). Refuses a target whose
    verdict is not `passed`."""
    check_reachable(tracking_uri)
    client = _client(tracking_uri)
    with promotion_lock(client, model_name):
        current = alias_holder(client, model_name, APPROVED)
        if current is None:
            raise LookupError(f"model {model_name!r} has no version with alias {APPROVED!r}")
        previous = client.get_model_version(model_name, current).tags.get("previous_approved")
        if not previous:
            raise LookupError(f"version {current} of {model_name!r} replaced no earlier approved version")
        verdict = client.get_model_version(model_name, previous).tags.get("verdict")
        if verdict != "passed":
            raise LookupError(f"version {previous} of {model_name!r} has verdict {verdict!r}, not 'passed'")
        client.set_registered_model_alias(model_name, APPROVED, previous)
        client.set_model_version_tag(model_name, current, "rolled_back_to", previous)
        append_log(client, model_name, "rolled_back", previous, previous=current, verdict=verdict)
    return current, previous


def versions(tracking_uri: str, model_name: str) -> list[dict]:
    """Every version with its aliases and the evidence tags, newest first."""
    check_reachable(tracking_uri)
    client = _client(tracking_uri)
    found = client.search_model_versions(f"name = '{model_name}'")
    aliases: dict[str, list[str]] = {}
    for alias in (CANDIDATE, APPROVED):
        holder = alias_holder(client, model_name, alias) if found else None
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
    """Version, run and logged metrics of the currently approved model; None only when the
    registry answers that no version holds `approved`."""
    version = approved_version(tracking_uri, model_name)
    if version is None:
        return None
    client = _client(tracking_uri)
    run_id = client.get_model_version(model_name, version).run_id
    return {"version": version, "run_id": run_id, "metrics": dict(client.get_run(run_id).data.metrics)}
