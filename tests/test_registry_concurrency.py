"""The registry through a real `mlflow server` on loopback: concurrent promotions keep the chain
whole, and an unreachable server is an error within seconds, never "no approved model"."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io import sha256_file
from tests.conftest import REPO, run_stage
from tests.test_mlflow_server import mlflow_server  # noqa: F401 (module-scoped fixture: one server here)

pytestmark = pytest.mark.slow
DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once


def register_process(root: Path, uri: str, pause_s: float) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ROBUSTGATE_PROMOTION_PAUSE_S": str(pause_s),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "register", "--workspace", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_concurrent_approvals_keep_the_rollback_chain(pipeline_workspace, tmp_path, mlflow_server,  # noqa: F811
                                                      monkeypatch, capsys):
    """Two `robustgate register` processes approve at once; rollback then walks back through both.
    Each pauses 3 s between reading `approved` and moving it (ROBUSTGATE_PROMOTION_PAUSE_S), so
    without the promotion lock both read the same previous version and the first rollback skips one
    (checked by removing the lock from `pipeline.registry._register`: the test then fails)."""
    from mlflow import MlflowClient

    model = "tiny-model"
    roots = [tmp_path / name for name in ("a", "b", "c")]
    for root in roots:
        shutil.copytree(pipeline_workspace, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert run_stage("register", roots[0]) == 0  # version 1: the approved baseline
    processes = [register_process(root, mlflow_server, 3.0) for root in roots[1:]]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs

    client = MlflowClient(mlflow_server)
    approved = str(client.get_model_version_by_alias(model, "approved").version)
    second = client.get_model_version(model, approved).tags["previous_approved"]
    assert {approved, second} == {"2", "3"}  # the later promotion recorded the earlier one
    assert client.get_model_version(model, second).tags["previous_approved"] == "1"
    capsys.readouterr()
    assert run_stage("rollback", roots[0]) == 0
    assert f"from version {approved} back to version {second}" in capsys.readouterr().out
    assert run_stage("rollback", roots[0]) == 0
    assert f"from version {second} back to version 1" in capsys.readouterr().out
    assert [m.name for m in client.search_registered_models() if m.name.endswith(".promotion-lock")] == []
    from pipeline.registry import promotion_log  # the ordered log (issue 18) holds every event, in order

    events = [(e["seq"], e["event"], e["version"], e.get("previous")) for e in promotion_log(mlflow_server, model)]
    assert [seq for seq, *_ in events] == list(range(1, len(events) + 1))
    moves = [(version, previous) for _, event, version, previous in events if event in ("approved", "rolled_back")]
    assert moves == [("1", None), (second, "1"), (approved, second), (second, approved), ("1", second)]


@pytest.mark.parametrize("stage", ["status", "rollback", "report"])
def test_unreachable_registry_fails_fast_and_says_so(pipeline_workspace, tmp_path, monkeypatch, capsys, stage):
    """Before: status, rollback and report retried for ~4 minutes; then rollback said there was no
    approved version and the report printed "No previously approved model", a false sentence."""
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    before = {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    started = time.monotonic()
    assert run_stage(stage, root) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"robustgate {stage}: REGISTRY UNREACHABLE:" in err and "is unreachable" in err
    assert len(err.strip().splitlines()) == 1
    assert {p: sha256_file(p) for p in root.rglob("*") if p.is_file()} == before
