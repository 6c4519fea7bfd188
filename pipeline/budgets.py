"""Per-feature perturbation budgets of tabular data, from the units the laboratory reports to
the radii of an L∞ box (one number per feature, ε multiplies them all).

Without declared budgets, a tabular feature's radius is one training standard deviation, so
`threat.epsilon` reads in standard deviations. Categorical features are immutable (a code has no
neighbourhood); integer features take integer values only: adversarial examples are rounded into
the integer points of the box (`LpBall.to_lattice`) and the MILP treats them as integer variables,
while bound propagation certifies the continuous box, a superset (conservative for them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UsageError


@dataclass(frozen=True)
class FeatureRadius:
    name: str
    type: str
    radius: float  # at ε = 1, in the feature's unit
    budget: str  # how it was declared


def _radius(budget, std: float, absmax: float) -> float:
    if budget.immutable:
        return 0.0
    if budget.absolute is not None:
        return budget.absolute
    if budget.relative is not None:
        return budget.relative * absmax
    if budget.std is not None:
        return budget.std * std
    return budget.uncertainty * (2.0 if budget.k is None else budget.k)


def feature_radii(threat, names, types, std: np.ndarray, absmax: np.ndarray) -> list[FeatureRadius]:
    """The radius of every feature at ε = 1; a budget for a feature the data lacks, a feature
    without one (when budgets are declared and `threat.unlisted` is not), or a budget on a
    categorical feature is bad input."""
    declared = threat.features
    if declared is not None:
        unknown = sorted(set(declared) - set(names))
        if unknown:
            raise UsageError(f"threat.features: {unknown[0]!r} is not a feature of the data "
                             f"(features: {', '.join(list(names)[:8])}{', ...' if len(names) > 8 else ''})")
        missing = [n for n in names if n not in declared]
        if missing and threat.unlisted is None:
            raise UsageError(f"threat.features: {len(missing)} feature(s) have no budget (first: {missing[0]!r}); "
                             "list them or set threat.unlisted")
    radii = []
    for j, (name, kind) in enumerate(zip(names, types)):
        budget = None if declared is None else declared.get(name, threat.unlisted)
        if kind == "categorical":
            if declared is not None and name in declared and not declared[name].immutable:
                raise UsageError(f"threat.features.{name}: a categorical feature is immutable; remove its budget")
            radii.append(FeatureRadius(name, kind, 0.0, "immutable (categorical)"))
        elif budget is None:
            radii.append(FeatureRadius(name, kind, float(std[j]), "±1 training standard deviation (default)"))
        else:
            radii.append(FeatureRadius(name, kind, float(_radius(budget, float(std[j]), float(absmax[j]))),
                                       budget.describe()))
    return radii
