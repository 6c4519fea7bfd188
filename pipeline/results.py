"""The typed results schema: one pydantic model per metrics file.

The stage that writes a file, the policy that reads it, the report that renders it
and the MLflow logging all go through these classes, so a renamed key or a string
where a number belongs fails where it is written, not silently in a consumer.

An accuracy is always an :class:`Accuracy`: point, interval, count and what kind of
claim it is (a point estimate, an upper bound from attacks, a lower bound from a
sound certificate, or a probabilistic certificate). Evidence that does not exist is
an explicit :class:`NotApplicable` with its reason, never a string in a number's place.
"""
from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import UsageError
from pipeline.stats import clopper_pearson

SCHEMA_VERSION = 3

# Environment variables that change which kernels run or how their reductions are ordered; the runtime
# record lists those set, since the same seed can give other figures under them.
KERNEL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "CUBLAS_WORKSPACE_CONFIG")

AccuracyKind = Literal["point", "upper_bound", "lower_bound", "probabilistic_certificate"]
KIND_MEANING = {
    "point": "point estimate on the test split",
    "upper_bound": "upper bound on true robust accuracy (empirical attacks only)",
    "lower_bound": "lower bound on true robust accuracy (sound certificate)",
    "probabilistic_certificate": "certified for the smoothed classifier, each certificate failing with probability at most α",
}


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Accuracy(_Record):
    """A share of n test samples, with its exact 95% interval and what kind of claim it is."""

    status: Literal["ok"] = "ok"
    value: float = Field(ge=0.0, le=1.0)
    ci: tuple[float, float]
    n: int = Field(ge=1)
    successes: int = Field(ge=0)
    ci_method: str = "clopper-pearson 95%"
    kind: AccuracyKind
    method: str = Field(min_length=1, description="what produced it: the attacks, the certifier, the smoothing")

    @classmethod
    def of(cls, successes: int, n: int, kind: AccuracyKind, method: str) -> "Accuracy":
        lower, upper = clopper_pearson(int(successes), int(n))
        return cls(value=successes / n, ci=(lower, upper), n=n, successes=int(successes), kind=kind, method=method)


class NotApplicable(_Record):
    """Evidence that was not produced, and why."""

    status: Literal["not_applicable", "not_run"]
    reason: str = Field(min_length=1)


MaybeAccuracy = Annotated[Union[Accuracy, NotApplicable], Field(discriminator="status")]


class ThreatRecord(_Record):
    norm: Literal["linf", "l2"]
    epsilon: float = Field(ge=0.0)


class _StageResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    seed: int
    dataset_fingerprint: str


class RuntimeRecord(_Record):
    """Where a stage computed: same params and seed give the same figures only with the same
    threads, torch build and processor (pipeline.runtime.Runtime.record)."""

    device: str
    threads: int = Field(ge=1)
    processes: int = Field(ge=1)
    precision: str
    torch: str
    cpu_capability: str
    cpu: str = Field(description="vendor, family, model, stepping, name and a digest of the flags")
    gpu: Optional[str] = None
    environment: Optional[dict[str, str]] = Field(default=None, description=(
        "the KERNEL_VARIABLES that were set (empty: none of "
        "them); None: not recorded"))


class _ModelResult(_StageResult):
    """Evidence about one checkpoint: the SHA-256 of the `model.pt` it evaluated."""

    model_sha256: str = Field(min_length=64, max_length=64)
    runtime: Optional[RuntimeRecord] = None


# --- prepare ---------------------------------------------------------------------------------

class DomainRecord(_Record):
    lower_min: float
    upper_max: float


class PrepareResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    dataset: str
    dataset_name: str
    class_names: list[str]
    fingerprint: str
    seed: int
    input_shape: list[int]
    num_classes: int = Field(ge=2)
    samples: dict[str, int]
    class_counts: dict[str, list[int]]
    domain: DomainRecord
    params: dict[str, Any]


# --- train -----------------------------------------------------------------------------------

SelectionMetric = Literal["val_clean_accuracy", "val_robust_accuracy", "val_verified_accuracy"]


class TrainResult(_ModelResult):
    method: str
    epochs: int
    epochs_run: int
    stopped: str
    best_epoch: int
    selected_by: SelectionMetric = Field(description="the validation figure that chose the kept epoch")
    selection_rule: str
    seconds: float
    best_val_clean_accuracy: float
    best_val_robust_accuracy: float
    best_val_verified_accuracy: Optional[float] = None
    train_epsilon: float
    val_robust_attack: dict[str, Any]
    params: dict[str, Any]
    trained_for: Optional[dict[str, str]] = Field(
        None, description="the threat training targeted: name ('lp' or a condition), kind, description; None for "
                          "standard and noise training")


class ImportResult(_ModelResult):
    """The `train` stage's record when it imported a supplied model instead of training one:
    `model_sha256` is the supplied file's SHA-256 (models/model.pt holds its bytes unchanged)."""

    source: Literal["onnx", "torchscript", "state_dict"]
    path: str
    supplier: Optional[str]
    layout: Literal["nchw", "nhwc", "flat"]
    input_shape: list[int]
    num_classes: int
    opset: Optional[int]
    ops: list[str] = Field(description="the ONNX op types in the file (or in a TorchScript module's ONNX export); "
                                       "for a state_dict, the factory's leaf module types")
    torch_form: str = Field(description="how gradients and bounds see the file")
    max_abs_diff: Optional[float] = Field(description="torch form vs the supplied artifact (onnxruntime on an ONNX "
                                                      "file, the TorchScript module) on the test split; None for a "
                                                      "state_dict, whose torch form is the supplied module itself")
    n: int
    not_differentiable: Optional[str] = Field(None, description="the op no torch form exists for, when the stages "
                                                                "ran on onnxruntime alone (forward passes only)")


# --- attack ----------------------------------------------------------------------------------

class AttackRecord(_Record):
    settings: dict[str, Any]
    broken: int
    robust_accuracy: MaybeAccuracy


class SweepPoint(_Record):
    epsilon: float
    robust_accuracy: float
    ci_low: float
    ci_high: float
    n: int


class AttackSweep(_Record):
    attack: str
    n: int
    points: list[SweepPoint]


class MaskingRecord(_Record):
    status: Literal["pass", "fail", "not_run"]
    passed: Optional[float] = Field(alias="pass", default=None)
    detail: str
    values: dict[str, Any]
    meaning: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ClassRecord(_Record):
    n: int
    clean_accuracy: float
    robust_accuracy: float


class ReferenceCoverage(_Record):
    """Which attacks of a published reference suite ran, so a reader knows what was not tried."""

    reference: str
    attacks: list[str]
    run: list[str]
    not_run: list[str]


class AttackResult(_ModelResult):
    n: int
    threat: ThreatRecord
    split: Literal["test"] = "test"
    mode: Literal["independent", "sequential"]
    clean_accuracy: Accuracy
    robust_accuracy: Accuracy
    attacks: dict[str, AttackRecord]
    broken_by: dict[str, int]
    per_class: dict[str, ClassRecord]
    confusion_under_attack: list[list[int]]
    sweep: Optional[AttackSweep] = None
    masking: dict[str, MaskingRecord]
    masking_all_passed: float
    masking_failed: list[str]
    reference_suite: ReferenceCoverage
    task_notes: list[str] = Field(default_factory=list, description="how task-dependent defaults adapted")
    not_run: dict[str, str] = Field(default_factory=dict, description="configured attacks that could not run "
                                    "(gradient attacks on a model answering forward passes only), with why")


# --- certify ---------------------------------------------------------------------------------

class Soundness(_Record):
    attack_conflicts: int
    containment_violations: int
    points_checked: int
    samples_cross_checked: int
    tolerance: float


class CertifyMethodRecord(_Record):
    accuracy: Accuracy
    seconds: float
    requested: int
    budget_exhausted: bool
    soundness: Soundness


class CombinedRecord(_Record):
    methods: list[str]
    verified_by_this_method_only: dict[str, int]


class CertifySweepPoint(_Record):
    epsilon: float
    verified_accuracy: float
    ci_low: float
    ci_high: float
    n: int
    attack_robust_accuracy: float


class CertifySweep(_Record):
    method: str
    n: int
    points: list[CertifySweepPoint]


class CertifyResult(_ModelResult):
    status: Literal["ok", "not_applicable"]
    reason: Optional[str] = None
    n: int
    threat: ThreatRecord
    split: Literal["test"] = "test"
    requested_methods: list[str]
    verified_accuracy: dict[str, MaybeAccuracy]
    methods: dict[str, CertifyMethodRecord]
    combined: Optional[CombinedRecord] = None
    sweep: Optional[CertifySweep] = None
    tolerance: float


# --- smooth ----------------------------------------------------------------------------------

class SmoothPoint(_Record):
    radius: float
    linf_radius: float
    certified_accuracy: Accuracy


class SmoothResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    status: Literal["ok", "not_run"]
    reason: Optional[str] = None
    seed: Optional[int] = None
    dataset_fingerprint: Optional[str] = None
    model_sha256: Optional[str] = None
    sigma: Optional[float] = None
    n0: Optional[int] = None
    n_samples_per_input: Optional[int] = None
    alpha: Optional[float] = None
    n: Optional[int] = None
    input_dimension: Optional[int] = None
    certified_accuracy: dict[str, MaybeAccuracy] = Field(default_factory=dict)
    curve: list[SmoothPoint] = Field(default_factory=list)
    abstention_rate: Optional[float] = None
    mean_radius_correct: Optional[float] = None
    max_certifiable_radius: Optional[float] = Field(
        None, description="σ·Φ⁻¹(α^(1/n)): no sample can be certified beyond this L2 radius with these n and α")
    threat_coverage: Optional[str] = None
    forward_passes: Optional[int] = None
    seconds: Optional[float] = None
    base_training_method: Optional[str] = None
    base_trained_with_same_sigma: Optional[bool] = None
    runtime: Optional[RuntimeRecord] = None


# --- clinical --------------------------------------------------------------------------------

class ClassFigures(_Record):
    """One class read as the finding (one against the rest) on the test split: clean figures
    (point), under the attack stage's worst perturbation (upper bounds for the robust shares) and
    verified by the certify stage (lower bounds). Absent when the class or its complement is."""

    class_name: str
    n_positive: int = Field(ge=0)
    n_negative: int = Field(ge=0)
    sensitivity: MaybeAccuracy
    specificity: MaybeAccuracy
    ppv: MaybeAccuracy
    npv: MaybeAccuracy
    robust_sensitivity: MaybeAccuracy = Field(description="detected for every perturbation the attacks tried")
    robust_specificity: MaybeAccuracy
    adversarial_ppv: MaybeAccuracy = Field(description="PPV of the predictions at the attack's worst inputs")
    adversarial_npv: MaybeAccuracy
    verified_sensitivity: MaybeAccuracy = Field(description="proved detected for every perturbation in the budget")
    verified_specificity: MaybeAccuracy


class ReliabilityBin(_Record):
    lower: float
    upper: float
    n: int = Field(ge=0)
    confidence: Optional[float] = None  # mean confidence in the bin; None when empty
    accuracy: Optional[float] = None


class CalibrationRecord(_Record):
    confidence: str = "top-label softmax probability"
    n: int = Field(ge=1)
    ece: float = Field(ge=0.0, le=1.0, description="expected calibration error, equal-width bins")
    ece_ci: tuple[float, float]
    ci_method: str
    bins: list[ReliabilityBin]


class SelectivePoint(_Record):
    """Abstain below a confidence threshold: the share answered and the accuracy of the answers."""

    threshold: float
    coverage: float = Field(ge=0.0, le=1.0)
    answered: int = Field(ge=0)
    risk: Optional[float] = Field(None, description="error rate among the answered; None when none are")
    accuracy: MaybeAccuracy
    sensitivity: MaybeAccuracy = Field(description="of the positive class, counting an abstention as not detected")


class SmoothedSelective(_Record):
    """The smoothed classifier's own abstention (smooth stage)."""

    n: int = Field(ge=1)
    abstained: int = Field(ge=0)
    coverage: float
    accuracy: MaybeAccuracy


class ExactRecord(_Record):
    """Complete verification (MILP) of every test case over its box: verified, counterexample (an
    input the model itself misclassifies) or unknown (the solver ran out of time)."""

    method: str
    n: int = Field(ge=1)
    verified: int = Field(ge=0)
    counterexample: int = Field(ge=0)
    unknown: int = Field(ge=0)
    seconds: float
    time_budget_s: float
    case_limit_s: float
    positive_verified: MaybeAccuracy = Field(description="exact verified sensitivity (a lower bound while "
                                             "unknown cases remain; the exact share when none do)")
    positive_counterexamples: int = Field(ge=0)


class FeatureBudgetRecord(_Record):
    name: str
    type: Literal["continuous", "integer", "categorical"]
    radius: float = Field(ge=0.0, description="ε·s_i in the feature's unit")
    budget: str


class SubgroupRecord(_Record):
    """Every diagnostic figure again for the test cases with `column` = `value`."""

    column: str
    value: float
    n: int = Field(ge=1)
    positive: ClassFigures
    calibration: Optional[CalibrationRecord] = None
    selective: list[SelectivePoint] = Field(default_factory=list)
    exact: Optional[ExactRecord] = None


class ClinicalResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    status: Literal["ok", "not_applicable"]
    reason: Optional[str] = None
    seed: Optional[int] = None
    dataset_fingerprint: Optional[str] = None
    model_sha256: Optional[str] = None
    n: Optional[int] = None
    threat: Optional[ThreatRecord] = None
    positive_class: Optional[str] = None
    hazard: Optional[str] = None
    attacks: list[str] = Field(default_factory=list)
    verified_by: list[str] = Field(default_factory=list, description="certifiers whose union counts as verified")
    positive: Optional[ClassFigures] = None
    per_class: dict[str, ClassFigures] = Field(default_factory=dict)
    calibration: Optional[CalibrationRecord] = None
    selective: list[SelectivePoint] = Field(default_factory=list)
    smoothed: Union[SmoothedSelective, NotApplicable, None] = None
    subgroup_columns: list[str] = Field(default_factory=list)
    subgroups: list[SubgroupRecord] = Field(default_factory=list)
    smallest_subgroup_n: Optional[int] = None
    smallest_subgroup: Optional[str] = Field(None, description="`column = value` of the smallest subgroup")
    exact: Union[ExactRecord, NotApplicable, None] = None
    feature_budgets: list[FeatureBudgetRecord] = Field(default_factory=list)
    feature_handling: list[str] = Field(default_factory=list, description="how integer and categorical features "
                                        "were treated")

# --- conditions (triggering conditions: parametric input variations) --------------------------

class ConditionSanity(_Record):
    status: Literal["pass", "fail", "not_run"]
    detail: str
    values: dict[str, Any] = Field(default_factory=dict)


class ConditionFailure(_Record):
    """A test sample the search broke, with the parameters that broke it."""

    index: int
    label: int
    prediction: int
    params: list[float]


class ConditionHeatMap(_Record):
    """Accuracy at each point of a grid over one or two parameters (the whole set when it is finite)."""

    axes: list[str]
    points: list[list[float]]
    accuracy: list[float]
    n: int


class ConditionSearchRecord(_Record):
    components: list[Literal["enumeration", "grid", "random", "gradient"]]
    grid_points: int
    random_draws: int
    gradient_steps: int
    restarts: int
    copies_per_sample: int = Field(description="the budget: the most transformed copies one sample is given")
    copies_evaluated: int = Field(ge=0, description="transformed copies evaluated, all samples together (a "
                                  "sample leaves once broken, and the descent once it repeats a point)")
    gradient_copies: int = Field(ge=0, description="of which evaluated with a gradient")
    gradient_estimator: Optional[Literal["differences", "autograd"]] = Field(
        None, description="how the descent took the gradient's sign (forward differences or a backward pass); "
                          "None without a descent")
    exhaustive: bool
    seconds: float


class ConditionCertification(_Record):
    method: Literal["enumeration", "crown_bab"]
    complete: bool = Field(description="enumeration of a finite set: certified exactly when no element fails")
    boxes: int = 0
    rounds: int = 0
    max_boxes_per_sample: Optional[int] = None
    budget_exhausted: bool = False
    counterexamples: int = Field(0, description="box centres branch and bound found misclassified")
    bound_method: Optional[Literal["crown", "forward_crown"]] = Field(
        None, description="crown_bab: CROWN on the composed module, or forward mode on the folded affine transform")
    samples_cross_checked: int
    conflicts: int
    seconds: float


class ConditionSmoothing(_Record):
    """Randomized smoothing over the condition's parameter (rotation): what is certified is the smoothed
    classifier g(x; Δ) = argmax_c P_{θ~N(0,σ²)}[f(T(x, θ + Δ)) = c], for every offset |Δ| < the radius."""

    distribution: Literal["gaussian"] = "gaussian"
    sigma: float = Field(gt=0.0, description="σ of the parameter distribution, in the parameter's units")
    units: str
    n0: int
    n: int
    alpha: float = Field(description="failure probability of each certificate")
    radius: float = Field(description="the condition's radius max(|low|, |high|) the accuracy is certified at")
    largest_certifiable_radius: float = Field(description="R when all n draws agree: what n and α allow at most")
    certified_accuracy: Accuracy = Field(description="g correct and certified at the condition's radius")
    abstained: int
    median_radius: float
    offsets_checked: int = Field(description="certificates re-predicted at the range's ends (PREDICT)")
    disagreements: int = Field(description="of those, a non-abstaining prediction other than the certified class")
    interpolation_gap_mean: float = Field(description="mean max-pixel |T(T(x,Δ),θ) − T(x,θ+Δ)| at Δ = radius")
    interpolation_gap_max: float
    forward_passes: int
    seconds: float


class ConditionRecord(_Record):
    kind: str
    rationale: str
    description: str
    axes: dict[str, list[float]] = Field(description="parameter name -> [low, high]")
    set_size: Optional[int] = Field(None, description="elements of a finite parameter set")
    n: int
    clean_accuracy: Accuracy
    robust_accuracy: Accuracy
    certified_accuracy: MaybeAccuracy
    certification: Optional[ConditionCertification] = None
    unknown_share: Optional[float] = Field(None, description="robust minus certified: neither broken nor proven")
    search: ConditionSearchRecord
    heat_map: ConditionHeatMap
    sanity: dict[str, ConditionSanity]
    sanity_all_passed: float = Field(description="1 when no sanity check of the search failed")
    failures: list[ConditionFailure]
    config_sha256: str
    reused: bool = Field(False, description="carried over from the previous run: same settings, model and data")
    smoothed: Optional[ConditionSmoothing] = Field(None, description="randomized smoothing over the parameter")


class ConditionsResult(_ModelResult):
    """metrics/conditions.json: one record per named condition, keyed by its name, so a policy names
    `conditions.<name>.robust_accuracy`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, ConditionRecord] = Field(init=False)
    extra_record: typing.ClassVar[type] = ConditionRecord  # what metric_kind walks into for a name
    n: int
    split: Literal["test"] = "test"

    def conditions(self) -> dict[str, ConditionRecord]:
        return dict(self.__pydantic_extra__ or {})


# --- export ----------------------------------------------------------------------------------

class ExportResult(_ModelResult):
    onnx_sha256: str = Field(min_length=64, max_length=64)
    opset: int
    exporter: str
    max_abs_diff: float
    label_agreement: float
    n: int
    adv_max_abs_diff: float
    adv_label_agreement: float
    adv_n: int
    robust_accuracy_onnx: float
    robust_accuracy_torch: float
    robust_accuracy_diff: float
    metadata: dict[str, str]
    latency: dict[str, Any]
    latency_note: str


# --- properties ------------------------------------------------------------------------------

class InstanceRecord(_Record):
    onnx: str
    vnnlib: str
    timeout_s: float
    status: Literal["unsat", "sat", "unknown", "timeout"]
    phase: str = Field(description="what decided: attack, ibp, crown, alpha_crown, bab (input splitting), relu_bab (ReLU splitting), or why nothing did")
    seconds: float
    result_file: str = Field(description="the VNN-COMP result file, with the counterexample when sat")
    notes: list[str]
    onnx_sha256: Optional[str] = Field(None, description="the listed ONNX file's SHA-256 when decided")
    vnnlib_sha256: Optional[str] = Field(None, description="the listed VNNLIB file's SHA-256 when decided")


class PropertiesResult(_ModelResult):
    instances: Union[list[InstanceRecord], NotApplicable]
    totals: dict[str, int]
    unsat_fraction: Union[float, NotApplicable] = Field(description="share of the listed instances proven unsat")
    claims_written: int
    claims: str = Field(description="where the claims' VNNLIB files and instances.csv are, or why none were written")
    instances_sha256: Optional[str] = Field(None, description="SHA-256 of properties.instances (the CSV) when listed")


# --- trace (computed by the gate and the report, not a file) ----------------------------------

class TraceResult(_Record):
    dataset_fingerprint_consistent: float
    model_hash_consistent: float
    onnx_hash_matches: float
    splits_disjoint: float
    git_clean: float


# --- gate and register (records of decisions, not metrics a policy may name) ------------------

@dataclass(frozen=True)
class Row:
    """One requirement of a policy as evaluated: what the gate prints, writes and the report shows."""

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


class GateResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    passed: bool
    policy: str
    policy_name: str
    policy_sha256: str
    rows: list[Row]
    blocking_failures: list[str]
    trace: TraceResult
    artifacts: dict[str, str]
    git_commit: str
    signed: bool


class RegisterResult(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    model_name: str
    version: str
    run_id: str
    approved: bool
    previous_approved: Optional[str]
    tracking_uri: str
    onnx_sha256: str
    registered_onnx_sha256: str


RECORD_RESULTS: dict[str, type[BaseModel]] = {"gate": GateResult, "register": RegisterResult}

STAGE_RESULTS: dict[str, type[BaseModel]] = {
    "prepare": PrepareResult,
    "train": TrainResult,
    "attack": AttackResult,
    "certify": CertifyResult,
    "smooth": SmoothResult,
    "conditions": ConditionsResult,
    "export": ExportResult,
    "properties": PropertiesResult,
    "clinical": ClinicalResult,
    "trace": TraceResult,
}


def dump(result: BaseModel) -> dict:
    """The JSON-ready form a stage writes."""
    return result.model_dump(mode="json", by_alias=True)


def parse(stage: str, raw: Any, source: str) -> dict:
    """Validate one metrics file against its model; a truncated or hand-edited file is refused."""
    try:
        if stage == "train" and isinstance(raw, dict) and "source" in raw:  # train imported a supplied model
            return dump(ImportResult.model_validate(raw))
        return dump({**STAGE_RESULTS, **RECORD_RESULTS}[stage].model_validate(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise UsageError(f"{source}: does not match the {stage} results schema v{SCHEMA_VERSION} at {where}: "
                         f"{first['msg']}; re-run the stage") from None


def load(stage: str, path: Path) -> dict:
    """Read and validate `metrics/<stage>.json`; a file whose stage has no model here is only parsed."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not valid JSON ({error}); re-run the stage") from None
    return parse(stage, raw, str(path)) if stage in STAGE_RESULTS or stage in RECORD_RESULTS else raw


# --- metric paths, for policies --------------------------------------------------------------

MetricKind = Literal["accuracy", "number"]
_SEPARATOR = re.compile(r"\.(?!\d)|(?<!\d)\.")


def split_path(path: str) -> list[str]:
    """`smooth.certified_accuracy.0.25` -> [smooth, certified_accuracy, 0.25]: a dot between two
    digits belongs to a number (a radius or an ε), not to the path."""
    return _SEPARATOR.split(path)


def _members(annotation) -> list:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is Union:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def metric_kind(path: str) -> MetricKind:
    """What a policy's `stage.key[.key...]` names: an accuracy (with an interval) or a plain number.

    Walks the schema, so the valid paths are exactly those the stages write; raises
    ValueError naming the first part that does not exist."""
    stage, *keys = split_path(path)
    if stage not in STAGE_RESULTS:
        raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGE_RESULTS)}")
    current = [STAGE_RESULTS[stage]]
    walked = stage
    for key in keys:
        following = []
        for node in current:
            if isinstance(node, type) and issubclass(node, BaseModel):
                fields = {f.alias or name: f for name, f in node.model_fields.items()}
                if key in fields:
                    following += _members(fields[key].annotation)
                elif getattr(node, "extra_record", None) is not None:  # a record per user-chosen name
                    following.append(node.extra_record)
            elif typing.get_origin(node) is dict:
                following += _members(typing.get_args(node)[1])
        following = [f for f in following if f is not NotApplicable and f is not type(None)]
        if not following:
            raise ValueError(f"{walked} has no {key!r}")
        current, walked = following, f"{walked}.{key}"
    if Accuracy in current:
        return "accuracy"
    if any(node in (float, int, bool) for node in current):
        return "number"
    raise ValueError(f"{path} is not a number or an accuracy")
