"""One condition, end to end on one model: worst-case search, sanity checks, certificate, cross-check.

Pure: tensors and settings in, a typed :class:`ConditionRecord` plus per-sample rows and failure
images out. The stage reads and writes the files; `bench/` calls this directly.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.certify.bounds import NotBoundable
from pipeline.conditions.certify import branch_and_bound, cross_check
from pipeline.conditions.search import SearchOutcome, search
from pipeline.conditions.threats import Condition
from pipeline.results import (Accuracy, ConditionCertification, ConditionFailure, ConditionHeatMap,
                              ConditionRecord, ConditionSanity, ConditionSearchRecord, ConditionSmoothing,
                              NotApplicable)
from pipeline.threat import Domain

UNCERTIFIABLE = {
    "noise": "additive noise has no parameter box to bound (its direction is random)",
    "blur": "the Gaussian kernel is not bounded over σ_blur here",
    "rotation": "bilinear interpolation over the angle is not bounded here",
    "scaling": "bilinear interpolation over the scale is not bounded here",
}


BOUND_LABELS = {"crown": "CROWN", "forward_crown": "forward-mode bounds on the folded transform, then CROWN"}


def generator_for(seed: int, name: str) -> torch.Generator:
    """One generator per condition, so a condition's figures do not depend on which others run."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:6], "big")
    return torch.Generator().manual_seed(digest)


@dataclass
class Evaluation:
    record: ConditionRecord
    rows: list[dict]
    failure_images: dict[str, np.ndarray]


def _search_record(outcome: SearchOutcome, condition: Condition, cfg, seconds: float) -> ConditionSearchRecord:
    if outcome.exhaustive:
        components = ["enumeration"]
    else:
        components = ["grid"] + (["random"] if cfg.random else [])
        components += ["gradient"] if condition.differentiable and cfg.steps else []
    return ConditionSearchRecord(
        components=components, grid_points=len(outcome.grid), random_draws=0 if outcome.exhaustive else cfg.random,
        gradient_steps=cfg.steps if "gradient" in components else 0,
        restarts=cfg.restarts if "gradient" in components else 0, copies_per_sample=outcome.copies_per_sample,
        copies_evaluated=outcome.copies_evaluated, gradient_copies=outcome.gradient_copies,
        gradient_estimator=cfg.gradient if "gradient" in components else None, exhaustive=outcome.exhaustive,
        seconds=round(seconds, 3))


def _robust_share(outcome: SearchOutcome) -> float:
    return float(outcome.robust.float().mean())


def sanity_checks(model, x, y, condition: Condition, domain: Domain, settings, full: SearchOutcome,
                  seed: int) -> dict[str, ConditionSanity]:
    """(1) gradient search at least as strong as random search at equal budget; (2) robust accuracy
    not increasing as the range widens. Either failing means the search is too weak to trust."""
    cfg, tolerance = settings.search, settings.sanity.tolerance
    checks: dict[str, ConditionSanity] = {}
    if not settings.sanity.enabled:
        return checks
    if condition.differentiable and cfg.steps and not full.exhaustive:
        # equal budget in points: random draws as many as the descent's points, each a gradient query (a forward
        # difference's probes implement that query, as a backward pass would; they are not extra points)
        budget = cfg.steps + 1
        by_gradient = search(model, x, y, condition, domain, cfg, generator_for(seed, condition.name + "/g"),
                             settings.batch_size, use=("gradient",), random_draws=0)
        by_random = search(model, x, y, condition, domain, cfg, generator_for(seed, condition.name + "/r"),
                           settings.batch_size, use=(), random_draws=budget)
        g, r = _robust_share(by_gradient), _robust_share(by_random)
        checks["gradient_vs_random"] = ConditionSanity(
            status="pass" if g <= r + tolerance else "fail",
            detail=f"gradient search {g:.3f} vs random search {r:.3f} robust at {budget} points per sample",
            values={"gradient": g, "random": r, "budget": budget})
    else:
        why = ("the set is finite and enumerated" if full.exhaustive
               else "the transform is not differentiable in its parameters")
        checks["gradient_vs_random"] = ConditionSanity(status="not_run", detail=f"no gradient search: {why}")
    shares = []
    for scale in settings.sanity.scales:
        smaller = condition.scaled(scale)
        outcome = search(model, x, y, smaller, domain, cfg, generator_for(seed, f"{condition.name}/{scale}"),
                         settings.batch_size)
        shares.append((scale, _robust_share(outcome)))
    shares.append((1.0, _robust_share(full)))
    rising = [(a, b) for a, b in zip(shares, shares[1:]) if b[1] > a[1] + tolerance]
    checks["monotone_in_range"] = ConditionSanity(
        status="fail" if rising else "pass",
        detail=", ".join(f"{100 * s:g}% of the range: {v:.3f}" for s, v in shares),
        values={f"{s:g}": v for s, v in shares})
    return checks


def certify(model, x, y, condition: Condition, domain: Domain, num_classes: int, settings, outcome: SearchOutcome):
    """The certified accuracy (or why there is none) and its record; updates `outcome.robust` with any
    counter-example branch and bound finds (an empirical failure the search missed)."""
    n = len(y)
    broken = outcome.clean_correct & ~outcome.robust
    if condition.certification == "enumeration":
        started = time.perf_counter()
        certified = outcome.robust.clone()
        checked = cross_check(certified, broken, condition, "enumeration")
        accuracy = Accuracy.of(int(certified.sum()), n, "lower_bound",
                               f"enumeration of all {len(outcome.grid)} parameter values")
        return accuracy, ConditionCertification(method="enumeration", complete=True, samples_cross_checked=checked,
                                                conflicts=0, seconds=round(time.perf_counter() - started, 3))
    if condition.certification != "bounds":
        return NotApplicable(status="not_applicable", reason=f"empirical only: {UNCERTIFIABLE[condition.kind]}"), None
    if not settings.certify.enabled:
        return NotApplicable(status="not_run", reason="conditions.certify.enabled is false"), None
    try:
        bab = branch_and_bound(model, x, y, condition, domain, num_classes, settings.certify)
    except NotBoundable as error:
        return NotApplicable(status="not_applicable", reason=f"auto_LiRPA cannot bound this model: {error}"), None
    certified = bab.verified & outcome.clean_correct
    checked = cross_check(certified, broken, condition, "CROWN branch and bound")
    found = bab.counterexample & outcome.robust
    if found.any():
        outcome.worst.theta[found] = bab.counter_theta[found]
        with torch.no_grad():
            moved = condition.transform(x[found], bab.counter_theta[found], domain)
            outcome.worst.prediction[found] = model(moved).argmax(1)
    outcome.robust &= ~bab.counterexample
    accuracy = Accuracy.of(int(certified.sum()), n, "lower_bound",
                           f"{BOUND_LABELS[settings.certify.method]} over the parameter box, branch and bound up to "
                           f"{settings.certify.max_boxes} boxes")
    return accuracy, ConditionCertification(
        method="crown_bab", bound_method=settings.certify.method, complete=False, boxes=bab.boxes, rounds=bab.rounds,
        max_boxes_per_sample=settings.certify.max_boxes, budget_exhausted=bab.budget_exhausted,
        counterexamples=int(found.sum()), samples_cross_checked=checked, conflicts=0, seconds=round(bab.seconds, 3))


def smoothed(model, x, y, condition: Condition, domain: Domain, num_classes: int, cfg, seed: int,
             batch_size: int) -> ConditionSmoothing:
    """The angle-smoothed classifier's certificate at the condition's radius (pipeline/conditions/smoothing.py)."""
    from pipeline.conditions.smoothing import largest_certifiable_radius, smooth_condition

    started = time.perf_counter()
    outcome = smooth_condition(model, x, y, condition, domain, num_classes, cfg,
                               generator_for(seed, condition.name + "/smoothing"), batch_size)
    n = len(y)
    accuracy = Accuracy.of(int(outcome.certified.sum()), n, "probabilistic_certificate",
                           f"randomized smoothing over the {condition.axes[0]}, θ ~ N(0, {cfg.sigma:g}²), "
                           f"Clopper-Pearson at α = {cfg.alpha:g}")
    return ConditionSmoothing(
        sigma=cfg.sigma, units=condition.units[0], n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, radius=outcome.radius,
        largest_certifiable_radius=round(largest_certifiable_radius(cfg.sigma, cfg.n, cfg.alpha), 6),
        certified_accuracy=accuracy, abstained=int((outcome.predictions < 0).sum()),
        median_radius=float(outcome.radii.median()) if n else 0.0, offsets_checked=outcome.offsets_checked,
        disagreements=outcome.disagreements, interpolation_gap_mean=round(outcome.gap_mean, 6),
        interpolation_gap_max=round(outcome.gap_max, 6), forward_passes=outcome.forward_passes,
        seconds=round(time.perf_counter() - started, 3))


def evaluate_condition(model, x, y, condition: Condition, domain: Domain, num_classes: int, settings,
                       seed: int, config_sha256: str, smoothing=None) -> Evaluation:
    """Everything the report and the gate say about one condition; `smoothing` (the condition's
    smoothing settings, rotation only) adds the smoothed classifier's probabilistic certificate."""
    started = time.perf_counter()
    outcome = search(model, x, y, condition, domain, settings.search, generator_for(seed, condition.name),
                     settings.batch_size)
    seconds = time.perf_counter() - started
    checks = sanity_checks(model, x, y, condition, domain, settings, outcome, seed)
    certified, certification = certify(model, x, y, condition, domain, num_classes, settings, outcome)
    n = len(y)
    robust = Accuracy.of(int(outcome.robust.sum()), n, "upper_bound",
                         "worst case of " + "+".join(_search_record(outcome, condition, settings.search, 0).components))
    broken = torch.nonzero(outcome.clean_correct & ~outcome.robust).flatten()[: settings.failures].tolist()
    worst = outcome.worst
    failures = [ConditionFailure(index=i, label=int(y[i]), prediction=int(worst.prediction[i]),
                                 params=[round(float(v), 6) for v in worst.theta[i]]) for i in broken]
    images = {}
    if broken:
        idx = torch.as_tensor(broken, device=x.device)
        with torch.no_grad():
            images = {"x": x[idx].cpu().numpy(), "x_condition": condition.transform(
                x[idx], worst.theta[idx], domain, _replay_noise(condition, x[idx], seed)).cpu().numpy(),
                "y": y[idx].cpu().numpy(), "prediction": np.array([f.prediction for f in failures])}
    rows = [{"index": i, "label": int(y[i]), "clean_correct": bool(outcome.clean_correct[i]),
             "robust": bool(outcome.robust[i]), "worst_margin": float(worst.margin[i]),
             "worst_params": [float(v) for v in worst.theta[i]]} for i in range(n)]
    grid_axes = list(condition.axes)
    record = ConditionRecord(
        kind=condition.kind, rationale=condition.rationale, description=condition.describe(),
        axes={a: [float(lo), float(hi)] for a, lo, hi in zip(condition.axes, condition.low, condition.high)},
        set_size=len(outcome.grid) if outcome.exhaustive else None, n=n,
        clean_accuracy=Accuracy.of(int(outcome.clean_correct.sum()), n, "point", "clean inputs"),
        robust_accuracy=robust, certified_accuracy=certified, certification=certification,
        unknown_share=(robust.value - certified.value) if isinstance(certified, Accuracy) else None,
        search=_search_record(outcome, condition, settings.search, seconds),
        heat_map=ConditionHeatMap(axes=grid_axes, points=[[float(v) for v in p] for p in outcome.grid],
                                  accuracy=[float(a) for a in outcome.grid_accuracy], n=n),
        sanity=checks, sanity_all_passed=float(all(c.status != "fail" for c in checks.values())),
        failures=failures, config_sha256=config_sha256,
        smoothed=None if smoothing is None else smoothed(model, x, y, condition, domain, num_classes, smoothing,
                                                         seed, settings.batch_size))
    return Evaluation(record, rows, images)


def _replay_noise(condition: Condition, x: torch.Tensor, seed: int):
    """Noise failures are shown at the worst σ with a fresh draw: the image illustrates the condition, the
    prediction listed is the one the search recorded."""
    if not condition.stochastic:
        return None
    generator = generator_for(seed, condition.name + "/gallery")
    return torch.randn(x.shape, generator=generator).to(x.device)

