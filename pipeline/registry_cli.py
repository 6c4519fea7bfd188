"""`robustgate status` and `robustgate rollback`: the release manager's view of the registry.

Both fail within seconds on an unreachable registry (exit 1): "no approved version"
is said only by a registry that answered.
"""
from __future__ import annotations

import os

from pipeline.errors import GateFailed, IntegrityMismatch
from pipeline.registry import default_tracking_uri, registered_onnx_sha256, registry_errors, rollback as move_back
from pipeline.registry import promotion_log, versions
from pipeline.workspace import Workspace


def tracking_uri(ws: Workspace) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ws.root)


def status(ws: Workspace) -> int:
    """The versions table; the bytes the registry serves for each aliased version are downloaded and
    compared with the hash the evidence recorded (exit 1 on a difference)."""
    name, uri = ws.params().registry.model_name, tracking_uri(ws)
    with registry_errors(uri, "listing versions"):
        rows = versions(uri, name)
        log = promotion_log(uri, name)
        for row in rows:
            if row["aliases"]:
                row["bytes"] = "same" if registered_onnx_sha256(uri, name, row["version"]) == row["onnx_sha256"] \
                    else "DIFFERENT"
    if not rows:
        print(f"status: no registered versions of {name!r}")
        return 0
    print_log(log)  # history first: the table of where the aliases are now ends the output
    print(f"status: {name} ({len(rows)} version{'s' if len(rows) > 1 else ''})")
    header = ("version", "aliases", "verdict", "onnx sha256", "dataset", "git commit", "registry bytes")
    table = [header] + [
        (r["version"], ",".join(r["aliases"]) or "-", r["verdict"], r["onnx_sha256"][:16],
         r["dataset_fingerprint"][:12], r["git_commit"][:12], r.get("bytes", "-"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    different = [r["version"] for r in rows if r.get("bytes") == "DIFFERENT"]
    if different:
        raise IntegrityMismatch(f"the registry serves an ONNX file whose SHA-256 differs from the evaluated one for "
                                f"version(s) {', '.join(different)}")
    return 0


def rollback(ws: Workspace) -> int:
    name, uri = ws.params().registry.model_name, tracking_uri(ws)
    try:
        with registry_errors(uri, "rolling back"):
            current, previous = move_back(uri, name)
    except LookupError as error:
        raise GateFailed(f"cannot roll back: {error}") from None
    print(f"rollback: {name} alias 'approved' moved from version {current} back to version {previous}")
    return 0


def describe(event: dict) -> str:
    """One line per promotion-log event, e.g. `#3 ... approved v2 (replaced v1)`."""
    kind, version = event.get("event", "?"), event.get("version", "?")
    if kind == "registered":
        tail = f"verdict {event.get('verdict')}, approved then v{event.get('approved')}" \
            if event.get("approved") else f"verdict {event.get('verdict')}, no approved version then"
    elif kind == "approved":
        tail = f"replaced v{event['previous']}" if event.get("previous") else "first approved version"
    elif kind == "rolled_back":
        tail = f"back from v{event.get('previous')}"
    elif kind == "refused":
        tail = f"verdict {event.get('verdict')}: approved not moved"
    else:
        tail = ""
    return f"  #{event.get('seq')}  {event.get('at', '?')}  {kind} v{version}" + (f" ({tail})" if tail else "")


def print_log(log: list[dict]) -> None:
    if not log:
        print("promotion log: empty (versions registered before the log existed are not in it)")
        return
    print(f"promotion log ({len(log)} event{'s' if len(log) > 1 else ''}, oldest first):")
    for event in log:
        print(describe(event))
