"""`.venv/bin/dvc repro` works without an activated environment: every stage calls bin/robustgate,
which runs `.venv/bin/robustgate` when it exists. Before, the commands were a bare `robustgate`
and failed with "command not found" unless the venv was activated."""
import shutil
import subprocess

import yaml

from tests.conftest import REPO

PLAIN_PATH = "/usr/bin:/bin"


def test_every_stage_command_goes_through_the_wrapper():
    for dvcfile in (REPO / "dvc.yaml", REPO / "studies/dvc.yaml"):
        for name, stage in yaml.safe_load(dvcfile.read_text())["stages"].items():
            cmd = stage.get("do", stage)["cmd"]
            assert cmd.startswith("bin/robustgate "), (dvcfile.name, name, cmd)


def test_wrapper_prefers_the_project_venv(tmp_path):
    (tmp_path / "bin").mkdir()
    shutil.copy2(REPO / "bin/robustgate", tmp_path / "bin/robustgate")
    missing = subprocess.run(["bin/robustgate", "prepare"], cwd=tmp_path, env={"PATH": PLAIN_PATH},
                             capture_output=True, text=True)
    assert missing.returncode == 127 and "make setup" in missing.stderr
    venv_cli = tmp_path / ".venv/bin/robustgate"
    venv_cli.parent.mkdir(parents=True)
    venv_cli.write_text('#!/bin/sh\necho "venv robustgate $*"\n')
    venv_cli.chmod(0o755)
    found = subprocess.run(["bin/robustgate", "prepare"], cwd=tmp_path, env={"PATH": PLAIN_PATH},
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "venv robustgate prepare"
