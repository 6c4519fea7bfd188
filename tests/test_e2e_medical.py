"""The documented medical examples, run as a user runs them: `cp examples/medical/<file> params.yaml
&& dvc repro` in a copy of the repository (real DVC, real stages, no mocks).

Before: no test ran them, so the passing example could stop passing (or the failing one fail for
another reason) without CI noticing."""
import json

import pytest
import yaml

from tests.conftest import REPO
from tests.test_e2e_dvc import copy_repository, ran, sh

pytestmark = pytest.mark.slow


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / "medical" / name).read_text())


def test_the_medical_example_passes_its_gate_and_is_registered(tmp_path_factory):
    root = copy_repository(tmp_path_factory.mktemp("medical"), example("params.yaml"))
    run = sh(["dvc", "repro"], root)
    assert {"clinical", "gate", "register"} <= set(ran(run.stdout))
    gate = json.loads((root / "metrics/gate.json").read_text())
    assert gate["passed"] and gate["policy"] == "policies/medical.yaml" and not gate["blocking_failures"]
    clinical = json.loads((root / "metrics/clinical.json").read_text())
    row = next(r for r in gate["rows"] if r["id"] == "MED-HAZ-1")
    assert row["passed"] and row["compared"] == pytest.approx(clinical["positive"]["robust_sensitivity"]["ci"][0])
    assert json.loads((root / "metrics/register.json").read_text())["approved"]
    html = (root / "reports/build/report.html").read_text()
    assert "Diagnostic performance under measurement error" in html and "Reliability diagram" in html


def test_the_failing_medical_example_fails_for_the_stated_reason(tmp_path_factory):
    """params_fail.yaml states: MED-HAZ-1 (robust sensitivity's lower bound) fails; nothing is registered."""
    root = copy_repository(tmp_path_factory.mktemp("medical_fail"), example("params_fail.yaml"))
    run = sh(["dvc", "repro"], root, check=False)
    assert run.returncode != 0
    assert "gate" in ran(run.stdout) and "register" not in ran(run.stdout)
    assert "GATE FAILED" in run.stdout + run.stderr and "MED-HAZ-1" in run.stdout + run.stderr
    gate = json.loads((root / "metrics/gate.json").read_text())
    assert not gate["passed"] and "MED-HAZ-1" in gate["blocking_failures"]
    row = next(r for r in gate["rows"] if r["id"] == "MED-HAZ-1")
    assert not row["passed"] and row["compared"] < row["threshold"]
    assert not (root / "metrics/register.json").exists()
