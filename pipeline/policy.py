"""Release policies as YAML, and their evaluation against the stages' metrics.

A requirement reads one metric (`<stage>.<key>[.<key>...]` into
`metrics/<stage>.json`), optionally its confidence bound instead of the point
estimate, and compares it with a threshold. A blocking requirement whose metric
is missing or `not_applicable` fails: absence of evidence never passes.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import format_validation_error, read_yaml
from pipeline.errors import UsageError

COMPARATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}

# Metric paths a policy may name; anything else is a typo the policy author must hear about.
KNOWN_METRICS = (
    "attack.clean_accuracy",
    "attack.robust_accuracy",
    "attack.attacks.*.robust_accuracy.value",
    "attack.masking_all_passed",
    "attack.masking.*.pass",
    "certify.verified_accuracy.*",
    "smooth.certified_accuracy.*",
    "smooth.abstention_rate",
    "export.max_abs_diff",
    "export.adv_max_abs_diff",
    "export.label_agreement",
    "export.adv_label_agreement",
    "export.robust_accuracy_diff",
    "train.best_val_clean_accuracy",
    "train.best_val_robust_accuracy",
    "trace.dataset_fingerprint_consistent",
    "trace.onnx_hash_matches",
    "trace.splits_disjoint",
    "trace.git_clean",
)


class Requirement(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    metric: str
    comparator: Literal[">=", ">", "<=", "<", "=="]
    threshold: float
    bound: Literal["point", "lower", "upper"] = "point"
    severity: Literal["blocking", "advisory"] = "blocking"
    clause: str = Field(min_length=1)
    rationale: Optional[str] = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if not any(fnmatch.fnmatchcase(metric, pattern) for pattern in KNOWN_METRICS):
            raise ValueError(f"unknown metric path; allowed: {', '.join(KNOWN_METRICS)}")
        return metric


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    requirements: list[Requirement] = Field(min_length=1)

    @field_validator("requirements")
    @classmethod
    def _unique_ids(cls, requirements: list[Requirement]) -> list[Requirement]:
        ids = [r.id for r in requirements]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate requirement id(s) {duplicates}")
        return requirements


def load_policy(path: Path) -> Policy:
    raw = read_yaml(path)
    try:
        return Policy.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error(path.name, error)
        first = error.errors()[0]["loc"]
        if len(first) >= 2 and first[0] == "requirements" and isinstance(raw, dict):
            try:
                message += f" (requirement {raw['requirements'][first[1]].get('id', first[1])!r})"
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        raise UsageError(message) from None


@dataclass(frozen=True)
class Row:
    id: str
    title: str
    metric: str
    bound: str
    measured: Any  # point estimate, or "missing" / "not_applicable"
    compared: Optional[float]  # the value actually compared (point or CI bound)
    comparator: str
    threshold: float
    severity: str
    clause: str
    passed: bool
    reason: str


def lookup(metrics: dict[str, dict], path: str) -> Any:
    """`stage.key.sub` into the stage's metrics; None when any part is absent."""
    stage, *keys = path.split(".")
    node: Any = metrics.get(stage)
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _interval_path(metric: str) -> str:
    stage, key, *rest = metric.split(".")
    return ".".join([stage, f"{key}_ci", *rest])


def evaluate_requirement(req: Requirement, metrics: dict[str, dict]) -> Row:
    measured = lookup(metrics, req.metric)

    def row(compared, passed, reason, shown=measured):
        return Row(req.id, req.title, req.metric, req.bound, shown, compared, req.comparator, req.threshold,
                   req.severity, req.clause, passed, reason)

    if measured is None:
        return row(None, False, "metric missing: the stage did not produce it", "missing")
    if measured == "not_applicable":
        return row(None, False, "not applicable to this model; no evidence", "not_applicable")
    if not isinstance(measured, (int, float)) or isinstance(measured, bool):
        return row(None, False, f"metric is {measured!r}, not a number", str(measured))
    compared = float(measured)
    if req.bound != "point":
        interval = lookup(metrics, _interval_path(req.metric))
        if not (isinstance(interval, list) and len(interval) == 2):
            return row(None, False, f"no confidence interval at {_interval_path(req.metric)}")
        compared = float(interval[0] if req.bound == "lower" else interval[1])
    passed = COMPARATORS[req.comparator](compared, req.threshold)
    which = "" if req.bound == "point" else f"{req.bound} 95% bound "
    verdict = "meets" if passed else "does not meet"
    return row(compared, passed, f"{which}{compared:.4g} {verdict} {req.comparator} {req.threshold:g}")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rows: list[Row]

    @property
    def blocking_failures(self) -> list[Row]:
        return [r for r in self.rows if r.severity == "blocking" and not r.passed]


def evaluate(policy: Policy, metrics: dict[str, dict]) -> Verdict:
    rows = [evaluate_requirement(req, metrics) for req in policy.requirements]
    return Verdict(all(r.passed for r in rows if r.severity == "blocking"), rows)


def format_table(rows: list[Row]) -> str:
    header = ("id", "requirement", "measured", "compared", "rule", "severity", "result")
    body = []
    for r in rows:
        measured = f"{r.measured:.4g}" if isinstance(r.measured, float) else str(r.measured)
        compared = "-" if r.compared is None else f"{r.compared:.4g} ({r.bound})"
        body.append((r.id, r.title, measured, compared, f"{r.comparator} {r.threshold:g}", r.severity,
                     "PASS" if r.passed else "FAIL"))
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)) for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def explain(rows: list[Row], policy: Policy) -> str:
    """Why each requirement passed or failed, with its clause and rationale."""
    rationale = {req.id: req.rationale for req in policy.requirements}
    blocks = []
    for r in rows:
        verdict = "PASS" if r.passed else ("FAIL (blocking)" if r.severity == "blocking" else "FAIL (advisory)")
        lines = [f"{r.id} {verdict}: {r.title}", f"  clause:    {r.clause}", f"  metric:    {r.metric}"]
        if rationale.get(r.id):
            lines.append(f"  rationale: {rationale[r.id]}")
        compared = "the point estimate" if r.bound == "point" else f"the {r.bound} end of the 95% interval"
        lines.append(f"  rule:      {compared} {r.comparator} {r.threshold:g}")
        lines.append(f"  because:   {r.reason}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
