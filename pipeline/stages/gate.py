"""Stage `gate`: the release decision. Exit 1 when a blocking requirement fails.

`metrics/gate.json` pins the SHA-256 of every artifact it judged, and is signed
(`metrics/gate.json.sig`) when a signing key is configured, so the register stage
and `robustgate verify` can refuse a verdict that was edited or files changed after it.
The decision itself is `pipeline.verdict.decide`, which register re-runs.
"""
from __future__ import annotations

from pipeline.errors import GateFailed
from pipeline.io import write_json
from pipeline.manifest import configured_signing_key, sign_file
from pipeline.policy import explain as explain_rows
from pipeline.policy import format_table
from pipeline.verdict import decide, gate_record_path
from pipeline.workspace import Workspace


def main(ws: Workspace, explain: bool = False) -> int:
    params = ws.params()
    key = configured_signing_key(ws.root, params)  # a bad key stops here, before anything is written
    decision = decide(ws)
    record_path = gate_record_path(ws)
    signature_path = record_path.with_name(record_path.name + ".sig")
    signature_path.unlink(missing_ok=True)  # never leave a signature of an earlier verdict beside a new one
    write_json(record_path, decision.record(ws.git_commit(), signed=key is not None))
    if key is not None:
        sign_file(record_path, key)
    print(f"gate: policy {decision.policy.name!r} ({params.gate.policy})")
    print(format_table(decision.verdict.rows))
    if explain:
        print()
        print(explain_rows(decision.verdict.rows, decision.policy))
    if not decision.passed:
        failed = ", ".join(decision.blocking_failures)
        raise GateFailed(f"blocking requirement(s) not met: {failed}; the model will not be registered")
    print("gate: PASSED")
    return 0
