"""The team's registry: a real PostgreSQL (initdb + pg_ctl in a temp dir, loopback port, a non-root
user when run as root) under a real `mlflow server` with a served artifact store, started by
`pipeline.mlflow_server` (what `make mlflow-server` runs). register, status, rollback, a race of
registrations, the promotion log, and a database that dies under the server.

Skipped, with the reason printed (pytest -ra), only when PostgreSQL or psycopg2 is not installed.
Before this change the promotion log did not exist (no `promotion_log.*` tags, `status` printed no
log) and `pipeline.mlflow_server` did not exist, so every test here failed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.io import sha256_file
from tests.conftest import REPO, run_stage

pytestmark = pytest.mark.slow
MODEL = "tiny-model"


def _why_not() -> str | None:
    from pipeline.mlflow_server import postgres_bin

    if postgres_bin() is None:
        return "PostgreSQL is not installed (no initdb/pg_ctl; `make system-deps` as root installs it)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed in this environment (pip install -e .)"
    if os.getuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started as another user"
    return None


@pytest.fixture(scope="module")
def pg_server():
    """(postgres, mlflow uri): both real, both stopped at the end."""
    from pipeline.mlflow_server import Postgres, default_pg_user, free_port, postgres_bin, prepare_directory
    from pipeline.mlflow_server import start_mlflow, stop_process

    reason = _why_not()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="robustgate-pg-"))  # not under pytest's 0700 tmp: the pg user reads it
    user = default_pg_user()
    prepare_directory(root, user)
    postgres = Postgres(postgres_bin(), root / "pgdata", free_port(), user)
    postgres.start()
    try:
        process, uri = start_mlflow(postgres.uri, root / "artifacts", free_port(), root / "mlflow.log")
        try:
            yield postgres, uri
        finally:
            stop_process(process)
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


def workspace(source: Path, into: Path, failing: bool = False) -> Path:
    shutil.copytree(source, into)
    if failing:  # a gate that fails: its registration may never hold `approved`
        policy = into / "policies" / "tiny.yaml"
        policy.write_text(policy.read_text().replace("threshold: 0.5", "threshold: 0.999"))
        assert run_stage("report", into) == 0 and run_stage("gate", into) == 1
    return into


def register_process(root: Path, uri: str, pause_s: float) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ROBUSTGATE_PROMOTION_PAUSE_S": str(pause_s),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "register", "--workspace", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def log_of(uri: str) -> list[dict]:
    from pipeline.registry import promotion_log

    return promotion_log(uri, MODEL)


def test_register_status_rollback_on_postgres(pipeline_workspace, tmp_path, pg_server, monkeypatch, capsys):
    from mlflow import MlflowClient

    postgres, uri = pg_server
    root = workspace(pipeline_workspace, tmp_path / "ws")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert run_stage("register", root) == 0
    assert run_stage("register", root) == 0
    client = MlflowClient(uri)
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["verdict"] == "passed" and v2.tags["previous_approved"] == "1"
    assert v2.tags["registered_onnx_sha256"] == sha256_file(root / "models/model.onnx")
    assert str(client.get_model_version_by_alias(MODEL, "approved").version) == "2"
    capsys.readouterr()
    assert run_stage("status", root) == 0
    out = capsys.readouterr().out
    assert "2        candidate,approved  passed" in out and "same" in out
    assert "promotion log (4 events, oldest first):" in out
    assert "#4" in out and "approved v2 (replaced v1)" in out
    assert run_stage("rollback", root) == 0
    assert "from version 2 back to version 1" in capsys.readouterr().out
    events = log_of(uri)
    assert [(e["seq"], e["event"], e["version"]) for e in events] == [
        (1, "registered", "1"), (2, "approved", "1"), (3, "registered", "2"), (4, "approved", "2"),
        (5, "rolled_back", "1")]
    assert events[-1]["previous"] == "2"
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()  # all went to the server


def test_racing_registrations_keep_a_complete_ordered_log(pipeline_workspace, tmp_path, pg_server, monkeypatch):
    """Two passing registrations and a failing one at once, each pausing 2 s inside the promotion
    window: `approved` ends on a passing version, the log holds every event with contiguous sequence
    numbers, and each approval names the approval before it (no lost update)."""
    from mlflow import MlflowClient

    _, uri = pg_server
    start = len(log_of(uri))
    roots = [workspace(pipeline_workspace, tmp_path / "a"), workspace(pipeline_workspace, tmp_path / "b"),
             workspace(pipeline_workspace, tmp_path / "c", failing=True)]
    processes = [register_process(root, uri, 2.0) for root in roots]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs

    events = log_of(uri)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    new = events[start:]
    registered = {e["version"]: e["verdict"] for e in new if e["event"] == "registered"}
    assert sorted(registered) == ["3", "4", "5"] and sorted(registered.values()) == ["failed", "passed", "passed"]
    failed = next(v for v, verdict in registered.items() if verdict == "failed")
    approvals = [e for e in events if e["event"] in ("approved", "rolled_back")]
    assert [e["version"] for e in approvals if e["event"] == "approved"][-2:] == \
        [e["version"] for e in new if e["event"] == "approved"]
    assert failed not in [e["version"] for e in approvals]
    for before, after in zip(approvals, approvals[1:]):  # the chain: each move names the holder it replaced
        assert after["previous"] == before["version"], (before, after)
    client = MlflowClient(uri)
    approved = str(client.get_model_version_by_alias(MODEL, "approved").version)
    assert approved == approvals[-1]["version"] and client.get_model_version(MODEL, approved).tags["verdict"] == "passed"
    assert [m.name for m in client.search_registered_models() if m.name.endswith(".promotion-lock")] == []


def test_database_down_fails_fast_and_keeps_local_files(pipeline_workspace, tmp_path, pg_server, monkeypatch, capsys):
    """PostgreSQL stops under a running MLflow server: register and status fail with one
    REGISTRY UNREACHABLE line within seconds (under 30 s), and no local file changes."""
    postgres, uri = pg_server
    root = workspace(pipeline_workspace, tmp_path / "ws")
    before = {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    postgres.stop()
    try:
        for stage in ("register", "status"):
            started = time.monotonic()
            assert run_stage(stage, root) == 1
            assert time.monotonic() - started < 30, stage
            err = capsys.readouterr().err
            assert f"robustgate {stage}: REGISTRY UNREACHABLE:" in err, err
    finally:
        postgres.start()
    assert {p: sha256_file(p) for p in root.rglob("*") if p.is_file()} == before
    assert json.loads(json.dumps(log_of(uri)))  # the server answers again once the database is back
