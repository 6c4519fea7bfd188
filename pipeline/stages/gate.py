"""Stage `gate`: the release decision. Exit 1 when a blocking requirement fails.

`metrics/gate.json` pins the SHA-256 of every artifact it judged, so the
register stage can refuse files changed after the gate.
"""
from __future__ import annotations

from dataclasses import asdict

from pipeline.errors import GateFailed
from pipeline.evidence import collect_metrics, hash_artifacts, traceability
from pipeline.io import confine, sha256_file, write_json
from pipeline.policy import evaluate, format_table, load_policy
from pipeline.policy import explain as explain_rows
from pipeline.workspace import SCHEMA_VERSION, Workspace


def main(ws: Workspace, explain: bool = False) -> int:
    params = ws.params()
    policy_path = confine(params.gate.policy, ws.root, "gate.policy")
    policy = load_policy(policy_path)
    metrics = collect_metrics(ws)
    metrics["trace"] = traceability(ws, metrics)
    verdict = evaluate(policy, metrics)
    write_json(ws.metrics("gate"), {
        "schema_version": SCHEMA_VERSION,
        "passed": verdict.passed,
        "policy": params.gate.policy,
        "policy_name": policy.name,
        "policy_sha256": sha256_file(policy_path),
        "rows": [asdict(row) for row in verdict.rows],
        "blocking_failures": [row.id for row in verdict.blocking_failures],
        "trace": metrics["trace"],
        "artifacts": hash_artifacts(ws),
        "git_commit": ws.git_commit(),
    })
    print(f"gate: policy {policy.name!r} ({params.gate.policy})")
    print(format_table(verdict.rows))
    if explain:
        print()
        print(explain_rows(verdict.rows, policy))
    if not verdict.passed:
        failed = ", ".join(row.id for row in verdict.blocking_failures)
        raise GateFailed(f"blocking requirement(s) not met: {failed}; the model will not be registered")
    print("gate: PASSED")
    return 0
