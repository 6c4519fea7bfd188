import pytest
import yaml

from pipeline.errors import UsageError
from pipeline.policy import Policy, evaluate, format_table, load_policy
from pipeline.results import Accuracy, NotApplicable, dump

THREAT = {"norm": "linf", "epsilon": 0.1}


def accuracy(value, ci, kind="upper_bound"):
    record = dump(Accuracy.of(round(value * 100), 100, kind, "test"))
    return {**record, "ci": list(ci)}


METRICS = {
    "attack": {"threat": THREAT, "clean_accuracy": accuracy(0.97, [0.91, 0.99], "point"),
               "robust_accuracy": accuracy(0.80, [0.76, 0.84])},
    "certify": {"threat": THREAT, "verified_accuracy": {
        "crown": accuracy(0.30, [0.25, 0.35], "lower_bound"),
        "ibp": dump(NotApplicable(status="not_applicable", reason="cannot bound the FFT"))}},
    "export": {"max_abs_diff": 3e-6},
}


def policy_rows(verdict):
    """The rows of the policy's own requirements (the threat and integrity rows follow them)."""
    return [r for r in verdict.rows if not r.id.startswith(("THREAT-", "INT-"))]


def req(**overrides):
    base = {"id": "R", "title": "t", "metric": "attack.robust_accuracy", "comparator": ">=",
            "threshold": 0.78, "clause": "ISO 21448 §7"}
    return {**base, **overrides}


def policy(*requirements):
    return Policy.model_validate({"name": "p", "requirements": list(requirements)})


def test_point_passes_but_lower_bound_fails():
    verdict = evaluate(policy(req(id="A"), req(id="B", bound="lower")), METRICS)
    assert [r.passed for r in policy_rows(verdict)] == [True, False]
    assert verdict.rows[1].compared == 0.76
    assert not verdict.passed and [r.id for r in verdict.blocking_failures] == ["B"]


def test_missing_and_not_applicable_fail_blocking():
    verdict = evaluate(policy(req(id="M", metric="certify.verified_accuracy.crown", threshold=0.1),
                              req(id="NA", metric="certify.verified_accuracy.ibp", threshold=0.0),
                              req(id="GONE", metric="export.label_agreement", threshold=0.0)), METRICS)
    assert [r.passed for r in policy_rows(verdict)] == [True, False, False]
    assert verdict.rows[1].measured == "not_applicable" and verdict.rows[2].measured == "missing"
    assert "cannot bound the FFT" in verdict.rows[1].reason


def test_advisory_failure_does_not_block():
    verdict = evaluate(policy(req(id="ADV", threshold=0.99, severity="advisory")), METRICS)
    assert verdict.passed and not verdict.rows[0].passed


def test_upper_comparisons():
    verdict = evaluate(policy(req(id="P", metric="export.max_abs_diff", comparator="<=", threshold=1e-4)), METRICS)
    assert verdict.passed
    assert "PASS" in format_table(verdict.rows)


@pytest.mark.parametrize("change,fragment", [
    ({"metric": "attack.robustness"}, "attack has no 'robustness'"),
    ({"metric": "attack.robust_accuracy_ci"}, "attack has no 'robust_accuracy_ci'"),
    ({"metric": "export.max_abs_diff", "bound": "lower"}, "needs an accuracy with a confidence interval"),
    ({"threshold": float("nan")}, "threshold"),
    ({"comparator": "=>"}, "comparator"),
    ({"clause": None}, "clause"),
    ({"severity": "fatal"}, "severity"),
])
def test_invalid_policies_name_the_requirement(tmp_path, change, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "requirements": [req(), req(id="BAD", **change)]}))
    with pytest.raises(UsageError) as info:
        load_policy(path)
    assert fragment in str(info.value) and "'BAD'" in str(info.value)


def test_shipped_policies_are_valid():
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "policies").glob("*.yaml"):
        assert load_policy(path).requirements


def test_gate_explain_and_traceability(pipeline_workspace, tmp_path, capsys):
    import json
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    trace_policy = {"name": "trace", "requirements": [
        req(id="ROB-1", threshold=0.0, clause="ISO 21448 §7", rationale="robust within ε"),
        req(id="DATA-1", metric="trace.dataset_fingerprint_consistent", comparator="==", threshold=1,
            clause="ISO/PAS 8800 §10"),
    ]}
    (root / "policies" / "tiny.yaml").write_text(yaml.safe_dump(trace_policy))
    from pipeline.cli import main

    assert main(["gate", "--workspace", str(root), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "ROB-1 PASS" in out and "clause:    ISO 21448 §7" in out and "rationale: robust within ε" in out
    assert "because:" in out
    gate = json.loads((root / "metrics/gate.json").read_text())
    assert gate["trace"]["dataset_fingerprint_consistent"] == 1.0
    assert gate["trace"]["splits_disjoint"] == 1.0 and gate["trace"]["onnx_hash_matches"] == 1.0

    # a checkpoint from other data breaks the traceability requirement
    meta_path = root / "models" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset_fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert main(["gate", "--workspace", str(root)]) == 1
    gate = json.loads((root / "metrics/gate.json").read_text())
    assert gate["trace"]["dataset_fingerprint_consistent"] == 0.0
    assert gate["blocking_failures"] == ["DATA-1", "INT-DATASET"]


def test_threat_rows_pin_norm_and_epsilon_and_refuse_clean_only():
    """The threat cannot be weakened unnoticed: evidence at a smaller ε or another norm than the
    policy pins fails, and ε = 0 fails unless the policy accepts a clean-only evaluation."""
    pinned = {"name": "p", "threat": {"norm": "linf", "min_epsilon": 0.1}, "requirements": [req(threshold=0.0)]}
    assert evaluate(Policy.model_validate(pinned), METRICS).passed

    def with_threat(norm, epsilon):
        return {**METRICS, "attack": {**METRICS["attack"], "threat": {"norm": norm, "epsilon": epsilon}},
                "certify": {**METRICS["certify"], "threat": {"norm": norm, "epsilon": epsilon}}}

    weak = evaluate(Policy.model_validate(pinned), with_threat("linf", 0.05))
    assert not weak.passed and [r.id for r in weak.blocking_failures] == ["THREAT-EPS"]
    other = evaluate(Policy.model_validate(pinned), with_threat("l2", 0.5))
    assert [r.id for r in other.blocking_failures] == ["THREAT-NORM"]
    clean = with_threat("linf", 0.0)
    unpinned = {"name": "p", "requirements": [req(threshold=0.0)]}
    assert [r.id for r in evaluate(Policy.model_validate(unpinned), clean).blocking_failures] == ["THREAT-E0"]
    assert evaluate(Policy.model_validate({**unpinned, "allow_clean_only": True}), clean).passed
    mixed = {**METRICS, "certify": {**METRICS["certify"], "threat": {"norm": "linf", "epsilon": 0.2}}}
    assert [r.id for r in evaluate(Policy.model_validate(unpinned), mixed).blocking_failures] == ["THREAT-0"]


def test_shipped_policies_pin_their_threat():
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "policies").glob("*.yaml"):
        pin = load_policy(path).threat
        assert pin is not None and pin.min_epsilon > 0, path.name
