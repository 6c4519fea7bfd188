"""Complete verification of small ReLU networks over an input box, as a mixed-integer program.

For the tabular networks of the medical path (an affine standardisation, a few ReLU layers on
tens of features) every test case can be decided: the margin of the true class over each other
class is minimised over the box exactly (big-M encoding with interval bounds per neuron, solved
by HiGHS through `scipy.optimize.milp`). A positive minimum proves the case ("verified"); a
non-positive one comes with an input that the model itself misclassifies ("counterexample",
checked by a forward pass); a solver that runs out of time leaves the case "unknown". Features
marked integer are integer variables, so "verified" then means over the integer points of the
box (the exact domain of such a feature), not the continuous box around them.
Self-contained: knows nothing of stages or files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

VERIFIED, COUNTEREXAMPLE, UNKNOWN = "verified", "counterexample", "unknown"
MARGIN_TOLERANCE = 1e-6  # a minimum margin within this of 0 is not taken as a proof


class Unsupported(ValueError):
    """The network is not a sequence of affine maps and ReLUs this encoder reads."""


def affine_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network as [(W, b), ...] with a ReLU between consecutive entries: consecutive affine
    maps (a standardisation, then a Linear) are composed into one."""
    modules = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    pending: tuple[np.ndarray, np.ndarray] | None = None
    for module in modules:
        if isinstance(module, nn.Flatten):
            continue
        if isinstance(module, nn.ReLU):
            if pending is None:
                raise Unsupported("a ReLU without an affine layer before it")
            layers.append(pending)
            pending = None
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Standardize":
            raise Unsupported(f"layer {type(module).__name__} (only Linear, Standardize, ReLU, Flatten)")
        w = weight.detach().double().numpy()
        b = np.zeros(w.shape[0]) if bias is None else bias.detach().double().numpy()
        pending = (w, b) if pending is None else (w @ pending[0], w @ pending[1] + b)
    if pending is None:
        raise Unsupported("the network does not end with an affine layer")
    layers.append(pending)
    return layers


def _interval(layers, lower: np.ndarray, upper: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds of every hidden layer by interval arithmetic."""
    bounds = []
    low, high = lower, upper
    for w, b in layers[:-1]:
        center, radius = (low + high) / 2, (high - low) / 2
        pre_low, pre_high = w @ center + b - np.abs(w) @ radius, w @ center + b + np.abs(w) @ radius
        bounds.append((pre_low, pre_high))
        low, high = np.maximum(pre_low, 0), np.maximum(pre_high, 0)
    return bounds


def integer_box(lower: np.ndarray, upper: np.ndarray, integer: np.ndarray | None):
    """The box with the bounds of integer features moved in to the integers they enclose."""
    if integer is None:
        return lower, upper
    return np.where(integer, np.ceil(lower), lower), np.where(integer, np.floor(upper), upper)


def min_margin(layers, lower: np.ndarray, upper: np.ndarray, label: int, other: int, time_limit: float,
               integer: np.ndarray | None = None):
    """(status, minimum margin or None, minimising input or None) of logit[label] - logit[other];
    `integer` (bool per input feature) makes those inputs integer variables."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    lower, upper = integer_box(lower, upper, integer)
    pre = _interval(layers, lower, upper)
    sizes = [len(lower)] + [len(b) for _, b in layers[:-1]]
    # variables: x, then per hidden layer its activations a_k and indicators d_k
    offsets, start = [], len(lower)
    for size in sizes[1:]:
        offsets.append((start, start + size))
        start += 2 * size
    count = start
    lb, ub = np.zeros(count), np.zeros(count)
    lb[:len(lower)], ub[:len(lower)] = lower, upper
    integrality = np.zeros(count)
    if integer is not None:
        integrality[:len(lower)] = integer
    rows, row_lb, row_ub = [], [], []
    previous = (0, len(lower))
    for k, ((w, b), (low, high)) in enumerate(zip(layers[:-1], pre)):
        a0, d0 = offsets[k]
        lb[a0:a0 + len(b)], ub[a0:a0 + len(b)] = np.maximum(low, 0), np.maximum(high, 0)
        ub[d0:d0 + len(b)] = 1
        integrality[d0:d0 + len(b)] = 1
        for i in range(len(b)):
            a, d = a0 + i, d0 + i
            if high[i] <= 0:
                continue  # inactive: a = 0 through its bounds
            coeff = {previous[0] + j: -w[i, j] for j in range(previous[1])}
            if low[i] >= 0:  # active: a = w·a_prev + b
                rows.append({**coeff, a: 1.0}), row_lb.append(b[i]), row_ub.append(b[i])
                continue
            rows.append({**coeff, a: 1.0}), row_lb.append(b[i]), row_ub.append(np.inf)  # a >= pre
            rows.append({**coeff, a: 1.0, d: -low[i]}), row_lb.append(-np.inf), row_ub.append(b[i] - low[i])
            rows.append({a: 1.0, d: -high[i]}), row_lb.append(-np.inf), row_ub.append(0.0)  # a <= U d
        previous = (a0, len(b))
    w_out, b_out = layers[-1]
    direction = w_out[label] - w_out[other]
    objective = np.zeros(count)
    objective[previous[0]:previous[0] + previous[1]] = direction
    constant = b_out[label] - b_out[other]
    matrix = lil_matrix((max(len(rows), 1), count))
    for r, row in enumerate(rows):
        for column, value in row.items():
            matrix[r, column] = value
    constraints = [LinearConstraint(matrix.tocsr(), row_lb, row_ub)] if rows else []
    result = milp(objective, integrality=integrality, bounds=Bounds(lb, ub), constraints=constraints,
                  options={"time_limit": max(time_limit, 0.01), "presolve": True})
    if result.x is None:
        return UNKNOWN, None, None
    value = float(result.fun + constant)
    if result.status == 0 and value > MARGIN_TOLERANCE:
        return VERIFIED, value, None
    return (COUNTEREXAMPLE if value <= 0 else UNKNOWN), value, result.x[:len(lower)]


@dataclass(frozen=True)
class ExactOutcome:
    status: str  # verified | counterexample | unknown
    seconds: float


def decide(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
           num_classes: int, time_limit: float, deadline: float | None = None,
           integer: torch.Tensor | None = None) -> list[ExactOutcome]:
    """Every case of (x, y) over its box [lower, upper] (one box per case), with the features marked
    in `integer` (one input's shape, bool) restricted to integers: verified, a counterexample the
    model itself confirms, or unknown (time limit, or no time left before `deadline`)."""
    layers = affine_layers(model)
    mask = None if integer is None else integer.flatten().numpy().astype(bool)
    outcomes = []
    for i in range(len(x)):
        started = time.perf_counter()
        if deadline is not None and time.monotonic() > deadline:
            outcomes.append(ExactOutcome(UNKNOWN, 0.0))
            continue
        low, high = integer_box(lower[i].flatten().double().numpy(), upper[i].flatten().double().numpy(), mask)
        with torch.no_grad():
            if int(model(x[i:i + 1]).argmax(1)) != int(y[i]):
                outcomes.append(ExactOutcome(COUNTEREXAMPLE, time.perf_counter() - started))
                continue
        status = VERIFIED
        for other in range(num_classes):
            if other == int(y[i]):
                continue
            found, _, witness = min_margin(layers, low, high, int(y[i]), other, time_limit, mask)
            if found == COUNTEREXAMPLE:
                if mask is not None:
                    witness = np.where(mask, np.round(witness), witness)  # the solver's 0.9999999 is 1
                point = torch.as_tensor(np.clip(witness, low, high), dtype=x.dtype).view_as(x[i:i + 1])
                with torch.no_grad():
                    wrong = int(model(point).argmax(1)) != int(y[i])
                status = COUNTEREXAMPLE if wrong else UNKNOWN  # a float-level tie is not a counterexample
                break
            if found == UNKNOWN:
                status = UNKNOWN
        outcomes.append(ExactOutcome(status, time.perf_counter() - started))
    return outcomes
