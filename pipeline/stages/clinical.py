"""Stage `clinical`: the diagnostic reading of the evidence (params section `clinical`).

Reads the attack stage's per-sample outcomes (adversarial prediction, robust), the certify
stage's per-sample verified flags (a sample counts when any certifier run verified it), the
smooth stage's abstentions, and the model's probabilities on the clean test split, and writes
sensitivity, specificity, PPV and NPV per class (the positive class first), calibration,
selective prediction and all of these again per subgroup (with its n) to `metrics/clinical.json`. Without a
`clinical` section it records that it does not apply.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import results
from pipeline.budgets import feature_radii
from pipeline.certify.smoothing import ABSTAIN
from pipeline.clinical import (Outcomes, calibration, check_clinical_params, class_figures, selective,
                               smoothed_selective)
from pipeline.errors import IntegrityMismatch, SoundnessViolation, UsageError
from pipeline.io import sha256_file, write_json
from pipeline.results import ClinicalResult, ExactRecord, FeatureBudgetRecord, NotApplicable, SubgroupRecord, ThreatRecord
from pipeline.clinical import share
from pipeline.stages.common import load_data, load_model_for, tensors
from pipeline.threat import from_params
from pipeline.workspace import Workspace

MAX_SUBGROUP_VALUES = 20


def _jsonl(path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"missing {path}: run the attack and certify stages first (dvc repro)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bound_to(ws: Workspace, stage: str, model_sha: str) -> dict:
    metrics = results.load(stage, ws.metrics(stage))
    if metrics.get("model_sha256") not in (None, model_sha):
        raise IntegrityMismatch(f"metrics/{stage}.json speaks of checkpoint {metrics['model_sha256'][:12]}, "
                                f"{ws.checkpoint.name} is {model_sha[:12]}: re-run {stage} (dvc repro)")
    return metrics


def _subgroups(x: np.ndarray, outcomes: Outcomes, probabilities: np.ndarray, cfg, names, positive: int,
               attacks: str, certifiers: str, seed: int, exact_of=None) -> list[SubgroupRecord]:
    """Per value of each subgroup column: the positive class's figures, calibration, selective
    prediction and (`exact_of`, given the MILP's answers) the exact verification on that subgroup's
    test cases alone."""
    groups = []
    for column in cfg.subgroups:
        values = x[:, names.index(column)]
        distinct = np.unique(values)
        if len(distinct) > MAX_SUBGROUP_VALUES:
            raise UsageError(f"clinical.subgroups: {column!r} has {len(distinct)} distinct values in the test split "
                             f"(at most {MAX_SUBGROUP_VALUES}); name a categorical column")
        for value in distinct:
            members = values == value
            probs, y = probabilities[members], outcomes.y[members]
            groups.append(SubgroupRecord(
                column=column, value=float(value), n=int(members.sum()),
                positive=class_figures(outcomes.subset(members), positive, cfg.positive_class, attacks, certifiers),
                calibration=calibration(probs, y, cfg.calibration_bins, cfg.bootstrap, seed),
                selective=selective(probs, y, positive, cfg.thresholds),
                exact=None if exact_of is None else exact_of(members)))
    return groups


def exact_verification(model, params, data, domain, x, y, outcomes: Outcomes, positive: int):
    """Complete MILP verification of every case within clinical.exact_time_budget_s, cross-checked:
    a case it proves may not have an adversarial example, nor a case a certifier proved a
    counterexample. Returns the record (None when not asked for; NotApplicable when the network or
    threat does not fit) and the per-case answers (None without them), which subgroups count again."""
    import time

    from pipeline.certify.milp import COUNTEREXAMPLE, VERIFIED, Unsupported, affine_layers, decide

    cfg = params.clinical
    if cfg.exact_time_budget_s is None:
        return None, None
    threat = from_params(params, data)
    if threat.norm != "linf":
        return NotApplicable(status="not_applicable", reason="the MILP encodes L∞ boxes; threat.norm is l2"), None
    if getattr(model, "not_boundable", None):  # a supplied model without its layers (pipeline.supplied.model)
        return NotApplicable(status="not_applicable", reason=f"the MILP needs the network's layers: "
                                                             f"{model.not_boundable}"), None
    try:
        affine_layers(model)
    except Unsupported as error:
        return NotApplicable(status="not_applicable", reason=f"the MILP reads ReLU MLPs only: {error}"), None
    low, high = threat.box(x, domain)
    decided = decide(model, x, y, low, high, data.num_classes, cfg.exact_case_limit_s,
                     deadline=time.monotonic() + cfg.exact_time_budget_s, integer=threat.integer)
    status = np.array([d.status for d in decided])
    proved_but_broken = np.flatnonzero((status == VERIFIED) & ~outcomes.robust)
    if len(proved_but_broken):
        raise SoundnessViolation(f"MILP verified case {int(proved_but_broken[0])}, which an attack broke")
    refuted_but_certified = np.flatnonzero((status == COUNTEREXAMPLE) & outcomes.verified)
    if len(refuted_but_certified):
        raise SoundnessViolation(f"MILP found a counterexample for case {int(refuted_but_certified[0])}, "
                                 "which a certifier verified")
    method = ("MILP (big-M, interval pre-activation bounds), HiGHS via scipy.optimize.milp"
              + ("; integer features as integer variables" if threat.integer is not None else ""))
    return exact_record(decided, outcomes.y, positive, method, cfg), decided


def exact_record(decided: list, y: np.ndarray, positive: int, method: str, cfg) -> ExactRecord:
    """The MILP's per-case answers counted, for the whole test split or one subgroup's cases."""
    from pipeline.certify.milp import COUNTEREXAMPLE, UNKNOWN, VERIFIED

    status = np.array([d.status for d in decided])
    pos = y == positive
    return ExactRecord(
        method=method, n=len(status), verified=int((status == VERIFIED).sum()),
        counterexample=int((status == COUNTEREXAMPLE).sum()), unknown=int((status == UNKNOWN).sum()),
        seconds=float(sum(d.seconds for d in decided)), time_budget_s=cfg.exact_time_budget_s,
        case_limit_s=cfg.exact_case_limit_s,
        positive_verified=share(int((pos & (status == VERIFIED)).sum()), int(pos.sum()), "lower_bound",
                                "MILP (complete)", "no positive case"),
        positive_counterexamples=int((pos & (status == COUNTEREXAMPLE)).sum()))


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.clinical
    if cfg is None:
        write_json(ws.metrics("clinical"), results.dump(ClinicalResult(
            status="not_applicable", reason="params name no clinical section (clinical.positive_class)")))
        write_json(ws.root / "plots" / "reliability.json", [])
        print("clinical: not applicable (no clinical section in params)")
        return 0
    data, domain, data_fingerprint = load_data(ws, params)
    class_names = results.load("prepare", ws.metrics("prepare"))["class_names"]
    check_clinical_params(params, class_names, data.feature_names)
    model_sha = sha256_file(ws.checkpoint)
    attack = _bound_to(ws, "attack", model_sha)
    certify = _bound_to(ws, "certify", model_sha)
    smooth = _bound_to(ws, "smooth", model_sha)
    model, _ = load_model_for(ws, params, data, data_fingerprint)
    attack_rows = _jsonl(ws.attack_samples)
    n = len(attack_rows)
    x, y = tensors(data, "test", n)
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1).numpy().astype(np.float64)
    y_np = y.numpy()
    if [r["label"] for r in attack_rows] != y_np.tolist():
        raise IntegrityMismatch("artifacts/attack/samples.jsonl labels differ from the prepared test split: "
                                "re-run attack (dvc repro)")
    certifiers = [m for m in certify.get("requested_methods", []) if m in (certify.get("methods") or {})]
    verified = np.zeros(n, bool)
    for row in _jsonl(ws.certify_samples) if certify["status"] == "ok" else []:
        if row["index"] < n:
            verified[row["index"]] = any(row.get(f"{m}_verified", False) for m in certifiers)
    outcomes = Outcomes(y=y_np, clean_pred=probabilities.argmax(axis=1),
                        adv_pred=np.array([r["adv_pred"] for r in attack_rows]),
                        robust=np.array([r["robust"] for r in attack_rows], bool), verified=verified)
    ran = [a for a in attack["attacks"] if a not in attack.get("not_run", {})]  # not_run: needed gradients
    attacks = "worst case over " + ", ".join(ran)
    certified_by = ("verified by any of " + ", ".join(certifiers) + (f" (first {certify['n']} of {n} cases; "
                    "the rest count as not verified)" if certify.get("n", n) < n else "")) if certifiers else \
        "no certifier ran: nothing counts as verified"
    positive = class_names.index(cfg.positive_class)
    per_class = {name: class_figures(outcomes, k, name, attacks, certified_by) for k, name in enumerate(class_names)}
    smooth_rows = _jsonl(ws.root / "artifacts" / "smooth" / "samples.jsonl") if smooth["status"] == "ok" else []
    threat = params.threat
    budgets, handling = [], []
    if data.tabular and threat.norm == "linf":
        radii = feature_radii(threat, data.feature_names, data.feature_types, data.std, data.absmax)
        budgets = [FeatureBudgetRecord(name=r.name, type=r.type, radius=threat.epsilon * r.radius, budget=r.budget)
                   for r in radii]
        kinds = set(data.feature_types)
        if "integer" in kinds:
            names = [r.name for r in radii if r.type == "integer"]
            handling.append(
                f"integer features ({', '.join(names)}): their domain is the integers x_i + k, |k| <= r_i, inside the "
                "data range; every adversarial example is rounded onto them (robust figures are over integer inputs), "
                "and the complete MILP verification treats them as integer variables (its verified figures are "
                "over exactly that set), while the bound-propagation certifiers prove the continuous box around "
                "them, a superset, so their verified figures are conservative")
        if "categorical" in kinds:
            handling.append("categorical features: immutable (radius 0)")
    exact, decided = exact_verification(model, params, data, domain, x, y, outcomes, positive)
    exact_of = None if decided is None else (
        lambda members: exact_record([d for d, m in zip(decided, members) if m], outcomes.y[members], positive,
                                     exact.method, cfg))
    subgroups = _subgroups(x.numpy(), outcomes, probabilities, cfg, list(data.feature_names or ()), positive,
                           attacks, certified_by, params.seed, exact_of)
    smallest = min(subgroups, key=lambda g: g.n, default=None)
    result = ClinicalResult(
        status="ok", seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha, n=n,
        threat=ThreatRecord(norm=threat.norm, epsilon=threat.epsilon), positive_class=cfg.positive_class,
        hazard=cfg.hazard, attacks=ran, verified_by=certifiers,
        positive=per_class[cfg.positive_class], per_class=per_class,
        calibration=calibration(probabilities, y_np, cfg.calibration_bins, cfg.bootstrap, params.seed),
        selective=selective(probabilities, y_np, positive, cfg.thresholds),
        smoothed=smoothed_selective(smooth_rows, ABSTAIN), subgroup_columns=list(cfg.subgroups),
        subgroups=subgroups, smallest_subgroup_n=None if smallest is None else smallest.n,
        smallest_subgroup=None if smallest is None else f"{smallest.column} = {smallest.value:g}",
        exact=exact, feature_budgets=budgets, feature_handling=handling)
    write_json(ws.metrics("clinical"), results.dump(result))
    write_json(ws.root / "plots" / "reliability.json", [b.model_dump() for b in result.calibration.bins])
    p = result.positive
    robust = p.robust_sensitivity
    print(f"clinical: positive class {cfg.positive_class!r}: sensitivity "
          f"{_fmt(p.sensitivity)}, robust {_fmt(robust)}, verified {_fmt(p.verified_sensitivity)}; "
          f"ECE {result.calibration.ece:.3f} [{result.calibration.ece_ci[0]:.3f}, {result.calibration.ece_ci[1]:.3f}]")
    return 0


def _fmt(a) -> str:
    return f"{a.value:.3f} [{a.ci[0]:.3f}, {a.ci[1]:.3f}] n={a.n}" if a.status == "ok" else a.status
