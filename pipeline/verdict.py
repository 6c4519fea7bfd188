"""The release decision as one function, so the gate that writes it and the register stage
that acts on it cannot disagree: `decide` evaluates the policy on the metrics;
`file_problems` and `verdict_problems` list every way a recorded verdict (`metrics/gate.json`)
fails to follow from the files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pipeline import results
from pipeline.evidence import collect_metrics, hash_artifacts, traceability
from pipeline.io import confine, sha256_file
from pipeline.manifest import check_file_signature, read_json_bytes
from pipeline.policy import Policy, Verdict, evaluate, load_policy
from pipeline.workspace import Workspace


@dataclass(frozen=True)
class Decision:
    policy_file: str
    policy: Policy
    policy_sha256: str
    metrics: dict
    verdict: Verdict
    artifacts: dict[str, str]

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def blocking_failures(self) -> list[str]:
        return [row.id for row in self.verdict.blocking_failures]

    def record(self, git_commit: str, signed: bool) -> dict:
        """What `metrics/gate.json` holds (validated by the results schema's GateResult)."""
        return results.dump(results.GateResult(
            passed=self.passed, policy=self.policy_file, policy_name=self.policy.name,
            policy_sha256=self.policy_sha256, rows=[asdict(row) for row in self.verdict.rows],
            blocking_failures=self.blocking_failures, trace=self.metrics["trace"], artifacts=self.artifacts,
            git_commit=git_commit, signed=signed))


def decide(ws: Workspace) -> Decision:
    """The policy named in params evaluated on the metrics and traceability checks as they are now."""
    params = ws.params()
    policy_path = confine(params.gate.policy, ws.root, "gate.policy")
    policy = load_policy(policy_path)
    metrics = collect_metrics(ws)
    metrics["trace"] = traceability(ws, metrics)
    return Decision(params.gate.policy, policy, sha256_file(policy_path), metrics, evaluate(policy, metrics),
                    hash_artifacts(ws))


def gate_record_path(ws: Workspace) -> Path:
    return ws.metrics("gate")


def read_record(path: Path) -> tuple[Optional[dict], list[str]]:
    if not path.is_file():
        return None, [f"{path.name} is missing: run `robustgate gate`"]
    record, problems = read_json_bytes(path.read_bytes(), path.name)
    if not problems and not (isinstance(record, dict) and isinstance(record.get("artifacts"), dict)
                             and isinstance(record.get("passed"), bool)):
        problems = [f"{path.name} is not a gate verdict (no 'passed' or 'artifacts')"]
    return (record if not problems else None), problems


def pinned_problems(pinned: dict, current: dict[str, str], what: str) -> list[str]:
    """Artifacts whose hash differs from `pinned` (or that are gone), and artifacts `what` never judged."""
    changed = sorted(name for name, digest in pinned.items() if current.get(name) != digest)
    unpinned = sorted(set(current) - set(pinned))
    return ([f"changed since {what} ran: {', '.join(changed)}"] if changed else []) + \
        ([f"not judged by {what}: {', '.join(unpinned)}"] if unpinned else [])


def file_problems(ws: Workspace, record: dict, public_pem: Optional[bytes], signature_required: bool) -> list[str]:
    """Why the files are not the ones `record` (gate.json) judged: a pinned hash that differs, an ONNX
    file the export stage did not check, a manifest listing other hashes, a missing or wrong
    signature. Checked before anything is parsed, since a tampered file may not even load."""
    from pipeline.io import read_json

    artifacts = hash_artifacts(ws)
    problems = pinned_problems(record["artifacts"], artifacts, "the gate")
    onnx_name = "models/model.onnx"
    export = read_json(ws.metrics("export")) if ws.metrics("export").is_file() else {}
    checked = export.get("onnx_sha256") if isinstance(export, dict) else None
    if onnx_name not in artifacts:
        problems.append(f"{onnx_name} is missing: run `robustgate export`")
    elif checked != artifacts[onnx_name]:
        problems.append(f"{onnx_name}: SHA-256 {artifacts[onnx_name][:16]}... is not the file the export stage "
                        f"checked ({str(checked)[:16]}...)")
    problems += manifest_problems(ws, artifacts, public_pem, signature_required)
    signature, _ = check_file_signature(gate_record_path(ws), public_pem,
                                        signature_required or record.get("signed") is True)
    return problems + signature


def verdict_problems(record: dict, decision: Decision) -> list[str]:
    """Where `record` differs from the verdict the policy gives on the metrics now."""
    problems = []
    if record.get("passed") is not decision.passed:
        problems.append(f"gate.json says passed={record.get('passed')}, but the policy evaluated on the metrics says "
                        f"passed={decision.passed} (blocking failures: {', '.join(decision.blocking_failures) or 'none'})")
    if sorted(record.get("blocking_failures") or []) != sorted(decision.blocking_failures):
        problems.append(f"gate.json lists blocking failures {record.get('blocking_failures')}, the policy gives "
                        f"{decision.blocking_failures}")
    if record.get("policy") != decision.policy_file or record.get("policy_sha256") != decision.policy_sha256:
        problems.append(f"the policy changed since the gate ran ({decision.policy_file}, SHA-256 now "
                        f"{decision.policy_sha256[:16]}...)")
    return problems


def manifest_problems(ws: Workspace, artifacts: dict[str, str], public_pem: Optional[bytes],
                      signature_required: bool) -> list[str]:
    """The report's manifest must list the same hashes for every file the gate judged, and carry a
    valid signature when one is configured (or it says it was signed)."""
    path = ws.report_html.parent / "manifest.json"
    if not path.is_file():
        return [f"{path.relative_to(ws.root)} is missing: run `robustgate report`"]
    listed, problems = read_json_bytes(path.read_bytes(), path.name)
    if problems:
        return problems
    listed = listed if isinstance(listed, dict) else {}
    hashes = listed.get("artifacts") if isinstance(listed.get("artifacts"), dict) else {}
    problems = [f"{name}: the manifest lists SHA-256 {str(hashes[name])[:16]}..., the file is {digest[:16]}..."
                for name, digest in sorted(artifacts.items()) if name in hashes and hashes[name] != digest]
    problems += [f"{name}: judged by the gate but not in the manifest" for name in ("models/model.onnx",)
                 if name in artifacts and name not in hashes]
    signature, _ = check_file_signature(path, public_pem, signature_required or listed.get("signed") is True)
    return problems + signature


def public_key_of(private_pem: Optional[bytes]) -> Optional[bytes]:
    from pipeline.manifest import public_key_pem

    return public_key_pem(private_pem) if private_pem is not None else None

