"""register, promote and rollback through a real `mlflow server` on loopback; a dead server loses nothing."""
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.io import sha256_file
from tests.conftest import run_stage

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_register_promote_rollback_through_server(pipeline_workspace, tmp_path, mlflow_server, monkeypatch, capsys):
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert run_stage("register", root) == 0
    assert run_stage("register", root) == 0  # a second passing release
    capsys.readouterr()
    assert run_stage("status", root) == 0
    status = capsys.readouterr().out
    assert "2        candidate,approved  passed" in status and "\n1        -" in status
    assert run_stage("rollback", root) == 0
    assert "from version 2 back to version 1" in capsys.readouterr().out
    from pipeline.registry import approved_version

    assert approved_version(mlflow_server, "tiny-model") == "1"
    assert run_stage("rollback", root) == 1  # version 1 replaced nothing
    assert "replaced no earlier approved version" in capsys.readouterr().err
    assert not (root / "mlflow.db").exists()  # everything went to the server


def test_unreachable_server_fails_fast_and_keeps_local_artifacts(pipeline_workspace, tmp_path, monkeypatch, capsys):
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    before = {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert run_stage("register", root) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "is unreachable" in err and "every local artifact is kept" in err
    after = {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}
    assert before == after
