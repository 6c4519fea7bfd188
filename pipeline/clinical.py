"""The figures a reviewer of a diagnostic classifier reads, from per-sample outcomes.

A class is read as the finding, one against the rest. Sensitivity counts the positive cases
detected, specificity the negative cases left alone; under perturbation a positive case counts
only if it is detected for every perturbation the attacks tried (robust: an upper bound) or
proved detected for every perturbation in the budget (verified: a lower bound). Every share
carries its exact interval and n. Calibration is the expected calibration error of the
top-label confidence with a bootstrap interval; selective prediction abstains below a
confidence threshold. Nothing here reads files: the `clinical` stage wires the arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UsageError
from pipeline.results import (Accuracy, CalibrationRecord, ClassFigures, NotApplicable, ReliabilityBin,
                              SelectivePoint, SmoothedSelective)


@dataclass(frozen=True)
class Outcomes:
    """Per test sample: label, clean and adversarial prediction, robust and verified flags."""

    y: np.ndarray
    clean_pred: np.ndarray
    adv_pred: np.ndarray
    robust: np.ndarray
    verified: np.ndarray

    def subset(self, mask: np.ndarray) -> "Outcomes":
        return Outcomes(self.y[mask], self.clean_pred[mask], self.adv_pred[mask], self.robust[mask],
                        self.verified[mask])


def check_clinical_params(params, class_names: list[str], feature_names) -> None:
    """Bad input before any work: a positive class the labels lack, a subgroup column the data lacks."""
    cfg = params.clinical
    if cfg is None:
        return
    if cfg.positive_class not in class_names:
        raise UsageError(f"clinical.positive_class = {cfg.positive_class!r}: not a class of the data "
                         f"(classes: {', '.join(class_names)})")
    for column in cfg.subgroups:
        if feature_names is None or column not in feature_names:
            raise UsageError(f"clinical.subgroups: {column!r} is not a feature column of the data")


def share(successes: int, n: int, kind: str, method: str, empty: str):
    """An Accuracy, or why there is none (no sample to count)."""
    if n == 0:
        return NotApplicable(status="not_applicable", reason=empty)
    return Accuracy.of(int(successes), int(n), kind, method)


def class_figures(o: Outcomes, label: int, name: str, attacks: str, certifiers: str) -> ClassFigures:
    pos, neg = o.y == label, o.y != label
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    said_pos, adv_said_pos = o.clean_pred == label, o.adv_pred == label
    no_pos, no_neg = f"no {name} case in the test split", f"no case other than {name} in the test split"
    return ClassFigures(
        class_name=name, n_positive=n_pos, n_negative=n_neg,
        sensitivity=share((pos & said_pos).sum(), n_pos, "point", "clean inputs", no_pos),
        specificity=share((neg & ~said_pos).sum(), n_neg, "point", "clean inputs", no_neg),
        ppv=share((pos & said_pos).sum(), said_pos.sum(), "point", "clean inputs", f"nothing predicted {name}"),
        npv=share((neg & ~said_pos).sum(), (~said_pos).sum(), "point", "clean inputs",
                  f"everything predicted {name}"),
        robust_sensitivity=share((pos & o.robust).sum(), n_pos, "upper_bound", attacks, no_pos),
        robust_specificity=share((neg & o.robust).sum(), n_neg, "upper_bound", attacks, no_neg),
        adversarial_ppv=share((pos & adv_said_pos).sum(), adv_said_pos.sum(), "point",
                              f"at the worst inputs of {attacks}", f"nothing predicted {name} under attack"),
        adversarial_npv=share((neg & ~adv_said_pos).sum(), (~adv_said_pos).sum(), "point",
                              f"at the worst inputs of {attacks}", f"everything predicted {name} under attack"),
        verified_sensitivity=share((pos & o.verified).sum(), n_pos, "lower_bound", certifiers, no_pos),
        verified_specificity=share((neg & o.verified).sum(), n_neg, "lower_bound", certifiers, no_neg),
    )


def _ece(confidence: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> float:
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, len(edges) - 2)
    total = 0.0
    for b in range(len(edges) - 1):
        members = which == b
        if members.any():
            total += members.sum() * abs(confidence[members].mean() - correct[members].mean())
    return float(total / len(confidence))


def calibration(probabilities: np.ndarray, y: np.ndarray, bins: int, resamples: int, seed: int) -> CalibrationRecord:
    """ECE over `bins` equal-width confidence bins, with a 95% percentile-bootstrap interval
    (`resamples` draws of the test split with replacement, seeded)."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rng = np.random.default_rng(seed)
    draws = [_ece(confidence[idx], correct[idx], edges)
             for idx in (rng.integers(0, len(y), len(y)) for _ in range(resamples))]
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    reliability = []
    for b in range(bins):
        members = which == b
        reliability.append(ReliabilityBin(
            lower=float(edges[b]), upper=float(edges[b + 1]), n=int(members.sum()),
            confidence=float(confidence[members].mean()) if members.any() else None,
            accuracy=float(correct[members].mean()) if members.any() else None))
    low, high = np.percentile(draws, [2.5, 97.5])
    return CalibrationRecord(n=len(y), ece=_ece(confidence, correct, edges), ece_ci=(float(low), float(high)),
                             ci_method=f"percentile bootstrap 95%, {resamples} resamples", bins=reliability)


def selective(probabilities: np.ndarray, y: np.ndarray, positive: int, thresholds: list[float]) -> list[SelectivePoint]:
    """Coverage against risk when the model abstains below each confidence threshold."""
    confidence, pred = probabilities.max(axis=1), probabilities.argmax(axis=1)
    pos = y == positive
    points = []
    for t in thresholds:
        answered = confidence >= t
        right = int((answered & (pred == y)).sum())
        count = int(answered.sum())
        points.append(SelectivePoint(
            threshold=t, coverage=count / len(y), answered=count, risk=None if count == 0 else 1 - right / count,
            accuracy=share(right, count, "point", f"answered at confidence >= {t:g}", "every case abstained"),
            sensitivity=share((answered & pos & (pred == positive)).sum(), pos.sum(), "point",
                              f"detected and answered at confidence >= {t:g}", "no positive case")))
    return points


def smoothed_selective(rows: list[dict], abstain: int) -> SmoothedSelective | NotApplicable:
    """The smoothed classifier's abstention: rows of the smooth stage (prediction, label)."""
    if not rows:
        return NotApplicable(status="not_run", reason="randomized smoothing did not run")
    answered = [r for r in rows if r["prediction"] != abstain]
    right = sum(r["prediction"] == r["label"] for r in answered)
    return SmoothedSelective(n=len(rows), abstained=len(rows) - len(answered), coverage=len(answered) / len(rows),
                             accuracy=share(right, len(answered), "point", "answered by the smoothed classifier",
                                            "the smoothed classifier abstained on every case"))
