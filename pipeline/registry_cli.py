"""`robustgate status` and `robustgate rollback`: the release manager's view of the registry."""
from __future__ import annotations

import os

from pipeline.errors import GateFailed
from pipeline.registry import default_tracking_uri, rollback as move_back, versions
from pipeline.workspace import Workspace


def tracking_uri(ws: Workspace) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ws.root)


def status(ws: Workspace) -> int:
    name = ws.params().registry.model_name
    rows = versions(tracking_uri(ws), name)
    if not rows:
        print(f"status: no registered versions of {name!r}")
        return 0
    print(f"status: {name} ({len(rows)} version{'s' if len(rows) > 1 else ''})")
    header = ("version", "aliases", "verdict", "onnx sha256", "dataset", "git commit")
    table = [header] + [
        (r["version"], ",".join(r["aliases"]) or "-", r["verdict"], r["onnx_sha256"][:16],
         r["dataset_fingerprint"][:12], r["git_commit"][:12])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


def rollback(ws: Workspace) -> int:
    name = ws.params().registry.model_name
    try:
        current, previous = move_back(tracking_uri(ws), name)
    except LookupError as error:
        raise GateFailed(f"cannot roll back: {error}") from None
    print(f"rollback: {name} alias 'approved' moved from version {current} back to version {previous}")
    return 0
