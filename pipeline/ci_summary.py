"""`python -m pipeline.ci_summary`: the CI job summary, in Markdown.

The gate table from `metrics/gate.json`, then each gated figure beside the one logged for
the model that holds `approved` in the registry, so a reviewer sees what a merge changes.
Written to `$GITHUB_STEP_SUMMARY` when set (GitHub Actions shows it on the run page), else
to stdout. A registry that cannot be asked says so in the summary; it never reads as
"no approved model".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from pipeline import results
from pipeline.errors import EvidenceError, UsageError
from pipeline.registry import flatten
from pipeline.workspace import Workspace

COMPARED_STAGES = ("attack", "certify", "smooth", "export")


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def gate_table(gate: dict) -> list[str]:
    lines = [f"**Gate {'PASSED' if gate['passed'] else 'FAILED'}** under policy `{gate['policy']}`"
             + (f" (blocking failures: {', '.join(gate['blocking_failures'])})" if gate["blocking_failures"] else ""),
             "", "| id | requirement | measured | compared | rule | severity | result |",
             "|---|---|---:|---:|---|---|---|"]
    for row in gate["rows"]:
        measured = _fmt(_number(row["measured"])) if _number(row["measured"]) is not None else str(row["measured"])
        compared = "-" if row["compared"] is None else f"{row['compared']:.4g} ({row['bound']})"
        lines.append(f"| {row['id']} | {row['title']} | {measured} | {compared} | {row['comparator']} "
                     f"{row['threshold']:g} | {row['severity']} | {'PASS' if row['passed'] else '**FAIL**'} |")
    return lines


def current_figures(ws: Workspace) -> dict[str, float]:
    """The run's figures under the keys register logs them with (`attack.clean_accuracy.value`, ...)."""
    loaded = {stage: results.load(stage, ws.metrics(stage)) for stage in COMPARED_STAGES if ws.metrics(stage).is_file()}
    return {key: number for key, value in flatten(loaded).items() if (number := _number(value)) is not None}


def metric_key(metric: str, figures: dict) -> Optional[str]:
    """A policy metric path (`attack.clean_accuracy`) as a logged key (an accuracy logs `.value`)."""
    for key in (f"{metric}.value", metric):
        if key in figures:
            return key
    return None


def change_since_approved(ws: Workspace, gate: dict) -> list[str]:
    from pipeline.stages.report import previous_approved

    model = ws.params().registry.model_name
    try:
        approved = previous_approved(ws, model)
    except EvidenceError as error:
        return [f"Change since the approved model: the registry could not be asked ({error})."]
    if approved is None:
        return [f"Change since the approved model: no version of `{model}` holds `approved` yet."]
    now, then = current_figures(ws), approved["metrics"]
    lines = [f"Change since the approved model (`{model}` version {approved['version']}, run `{approved['run_id']}`):",
             "", "| metric | approved | this change | difference |", "|---|---:|---:|---:|"]
    metrics = list(dict.fromkeys(row["metric"] for row in gate["rows"] if "." in row["metric"]))
    for metric in metrics:
        key = metric_key(metric, now) or metric_key(metric, then)
        if key is None:
            continue
        old, new = then.get(key), now.get(key)
        delta = "-" if old is None or new is None else f"{new - old:+.4g}"
        lines.append(f"| {metric} | {_fmt(old)} | {_fmt(new)} | {delta} |")
    return lines


def summary(ws: Workspace) -> str:
    path = ws.metrics("gate")
    if not path.is_file():
        raise UsageError(f"{path} is missing: the gate did not run (see the job log)")
    gate = results.load("gate", path)
    return "\n".join(["## RobustGate", "", *gate_table(gate), "", *change_since_approved(ws, gate)]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ci_summary", description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        text = summary(Workspace.at(args.workspace))
    except UsageError as error:
        print(f"ci-summary: error: {error}", file=sys.stderr)
        return 2
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(text)
        print(f"ci-summary: written to $GITHUB_STEP_SUMMARY ({target})")
    print(text, end="")  # the job log shows it too
    return 0


if __name__ == "__main__":
    sys.exit(main())
