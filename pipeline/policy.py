"""Release policies as YAML, and their evaluation against the stages' metrics.

A requirement reads one metric (`<stage>.<key>[.<key>...]` into
`metrics/<stage>.json`), optionally its confidence bound instead of the point
estimate, and compares it with a threshold. A blocking requirement whose metric
is missing or `not_applicable` fails: absence of evidence never passes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import results
from pipeline.config import format_validation_error, read_yaml
from pipeline.errors import UsageError
from pipeline.results import Row

COMPARATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}


class Requirement(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    metric: str
    comparator: Literal[">=", ">", "<=", "<", "=="]
    threshold: float = Field(allow_inf_nan=False)
    bound: Literal["point", "lower", "upper"] = "point"
    severity: Literal["blocking", "advisory"] = "blocking"
    clause: str = Field(min_length=1)
    rationale: Optional[str] = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        """Valid paths are exactly those the results schema defines (pipeline/results.py)."""
        results.metric_kind(metric)  # ValueError names the first part that does not exist
        return metric

    @model_validator(mode="after")
    def _interval_needs_accuracy(self) -> "Requirement":
        if self.bound != "point" and results.metric_kind(self.metric) != "accuracy":
            raise ValueError(f"bound: {self.bound} needs an accuracy with a confidence interval; "
                             f"{self.metric} is a plain number (use bound: point)")
        return self


class ThreatPin(BaseModel):
    """The threat the evidence must have been produced under: a weaker one fails the gate."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    norm: Literal["linf", "l2"]
    min_epsilon: float = Field(ge=0.0, allow_inf_nan=False)
    clause: str = Field("threat model pinned by the policy", min_length=1)


class ConditionPin(BaseModel):
    """A triggering condition the evidence must cover: its kind, and a range per parameter axis that
    the evaluated range must contain (a narrower evaluation fails the gate)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str = Field(min_length=1)
    range: dict[str, list[float]] = Field(default_factory=dict)
    clause: str = Field("triggering condition pinned by the policy", min_length=1)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    threat: Optional[ThreatPin] = None
    conditions: dict[str, ConditionPin] = Field(default_factory=dict)
    allow_clean_only: bool = Field(False, description="accept evidence produced at ε = 0 (clean accuracy only)")
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


def lookup(metrics: dict[str, dict], path: str) -> Any:
    """`stage.key.sub` into the stage's metrics; None when any part is absent."""
    stage, *keys = results.split_path(path)
    node: Any = metrics.get(stage)
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _not_produced(node: Any) -> Optional[str]:
    """The reason when a metric is an explicit NotApplicable record."""
    if isinstance(node, dict) and node.get("status") in ("not_applicable", "not_run"):
        return node.get("reason") or node["status"]
    return None


def evaluate_requirement(req: Requirement, metrics: dict[str, dict]) -> Row:
    measured = lookup(metrics, req.metric)

    def row(compared, passed, reason, shown=measured):
        return Row(req.id, req.title, req.metric, req.bound, shown, compared, req.comparator, req.threshold,
                   req.severity, req.clause, passed, reason)

    if measured is None:
        return row(None, False, "metric missing: the stage did not produce it", "missing")
    if _not_produced(measured) is not None:
        return row(None, False, f"not applicable: {_not_produced(measured)}; no evidence", "not_applicable")
    interval = None
    if isinstance(measured, dict) and "value" in measured and "ci" in measured:  # an Accuracy
        measured, interval = measured["value"], measured["ci"]
    if not isinstance(measured, (int, float)) or isinstance(measured, bool):
        return row(None, False, f"metric is {measured!r}, not a number", str(measured))
    compared = float(measured)
    if req.bound != "point":
        if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
            return row(None, False, f"no confidence interval for {req.metric}", measured)
        compared = float(interval[0] if req.bound == "lower" else interval[1])
    passed = COMPARATORS[req.comparator](compared, req.threshold)
    which = "" if req.bound == "point" else f"{req.bound} 95% bound "
    verdict = "meets" if passed else "does not meet"
    return row(compared, passed, f"{which}{compared:.4g} {verdict} {req.comparator} {req.threshold:g}", measured)


EVALUATED_STAGES = ("attack", "certify")


def threat_rows(policy: Policy, metrics: dict[str, dict]) -> list[Row]:
    """Rows no policy can drop: the evidence must be produced under the threat the policy pins, and
    ε = 0 (a clean-only evaluation) passes only a policy that says it accepts one."""
    rows = []
    threats = {stage: lookup(metrics, f"{stage}.threat") for stage in EVALUATED_STAGES}
    found = {stage: t for stage, t in threats.items() if isinstance(t, dict)}

    def row(rid, title, shown, passed, reason, clause, metric="attack.threat"):
        return Row(rid, title, metric, "point", shown, None, "==", 1.0, "blocking", clause, passed, reason)

    if not found:
        return [row("THREAT-0", "Evidence states its threat", "missing", False,
                    "no attack or certify metrics state the threat they were produced under", "integrity")]
    epsilons = {stage: float(t["epsilon"]) for stage, t in found.items()}
    norms = {stage: t["norm"] for stage, t in found.items()}
    same = len(set(epsilons.values())) == 1 and len(set(norms.values())) == 1
    rows.append(row("THREAT-0", "Attacks and certificates speak of one threat",
                    ", ".join(f"{s}: {norms[s]} ε={epsilons[s]:g}" for s in found), same,
                    "one threat throughout" if same else "stages were run under different threats", "integrity"))
    if not policy.allow_clean_only:
        clean_only = [s for s, e in epsilons.items() if e == 0.0]
        rows.append(row("THREAT-E0", "Not a clean-only evaluation (ε > 0)",
                        min(epsilons.values()), not clean_only,
                        "ε > 0" if not clean_only else "ε = 0 evaluates clean accuracy only; the policy does not "
                        "set allow_clean_only: true", "integrity", "attack.threat.epsilon"))
    if policy.threat is not None:
        pin = policy.threat
        wrong_norm = sorted(s for s, n in norms.items() if n != pin.norm)
        rows.append(row("THREAT-NORM", f"Threat norm is {pin.norm}", ", ".join(sorted(set(norms.values()))),
                        not wrong_norm, f"{pin.norm} as pinned" if not wrong_norm else
                        f"{', '.join(wrong_norm)} ran under another norm than the pinned {pin.norm}", pin.clause,
                        "attack.threat.norm"))
        weak = sorted(s for s, e in epsilons.items() if e < pin.min_epsilon)
        rows.append(row("THREAT-EPS", f"Threat ε ≥ {pin.min_epsilon:g}", min(epsilons.values()), not weak,
                        f"ε ≥ {pin.min_epsilon:g} as pinned" if not weak else
                        f"{', '.join(weak)} ran at ε below the pinned {pin.min_epsilon:g}", pin.clause,
                        "attack.threat.epsilon"))
    return rows


def condition_rows(policy: Policy, metrics: dict[str, dict]) -> list[Row]:
    """One blocking row per pinned condition: evaluated, of the pinned kind, over at least the pinned range."""
    rows = []
    for name, pin in policy.conditions.items():
        record = lookup(metrics, f"conditions.{name}")
        shown, passed, reason = "missing", False, f"no condition {name!r} in metrics/conditions.json"
        if isinstance(record, dict) and "kind" in record:
            evaluated = record.get("axes", {})
            shown = "; ".join(f"{a} [{lo:g}, {hi:g}]" for a, (lo, hi) in evaluated.items())
            narrow = [a for a, (lo, hi) in pin.range.items()
                      if a not in evaluated or evaluated[a][0] > lo or evaluated[a][1] < hi]
            passed = record["kind"] == pin.kind and not narrow
            reason = (f"{record['kind']} evaluated over at least the pinned range" if passed else
                      f"kind {record['kind']!r}, pinned {pin.kind!r}" if record["kind"] != pin.kind else
                      f"evaluated range narrower than pinned on {', '.join(narrow)}")
        title = f"Condition {name} ({pin.kind}) covers " + (", ".join(
            f"{a} [{lo:g}, {hi:g}]" for a, (lo, hi) in pin.range.items()) or "its kind")
        rows.append(Row(f"COND-{name}", title, f"conditions.{name}", "point", shown, None, "==", 1.0, "blocking",
                        pin.clause, passed, reason))
    return rows


INTEGRITY_CHECKS = {
    "model_hash_consistent": "Every piece of evidence speaks of the checkpoint on disk",
    "dataset_fingerprint_consistent": "Every piece of evidence speaks of the prepared data",
    "onnx_hash_matches": "The ONNX file is the one the export stage checked",
}


def integrity_rows(metrics: dict[str, dict]) -> list[Row]:
    """Blocking rows no policy can drop: evidence about another model, other data or another ONNX
    file says nothing about this one."""
    rows = []
    for key, title in INTEGRITY_CHECKS.items():
        value = lookup(metrics, f"trace.{key}")
        passed = value == 1.0
        rows.append(Row(f"INT-{key.split('_')[0].upper()}", title, f"trace.{key}", "point",
                        "missing" if value is None else value, value, "==", 1.0, "blocking", "integrity",
                        passed, "consistent" if passed else "inconsistent or missing: re-run dvc repro"))
    return rows


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rows: list[Row]

    @property
    def blocking_failures(self) -> list[Row]:
        return [r for r in self.rows if r.severity == "blocking" and not r.passed]


def evaluate(policy: Policy, metrics: dict[str, dict]) -> Verdict:
    """The policy's requirements, then the threat and integrity rows every policy carries."""
    rows = [evaluate_requirement(req, metrics) for req in policy.requirements]
    rows += threat_rows(policy, metrics)
    rows += condition_rows(policy, metrics)
    if "trace" in metrics:
        rows += integrity_rows(metrics)
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
