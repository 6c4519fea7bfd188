"""Verified robustness by bound propagation (IBP, CROWN) through auto_LiRPA.

For each sample the specification is "the true class beats every other class":
rows of C are e_y - e_j for j != y, so a positive lower bound on every row over
the whole ε-ball (intersected with the data domain) proves no perturbation in
the threat model changes the prediction. Bounds are computed in float32, so a
margin within float rounding of zero is not counted as verified.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import lirpa_compat
from pipeline.threat import Domain, LpBall

METHODS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN", "alpha_crown": "alpha-CROWN"}  # ours -> auto_LiRPA's


class NotBoundable(Exception):
    """auto_LiRPA cannot bound this model; the message names the layer."""


@dataclass(frozen=True)
class Certificate:
    method: str
    margin_lower: torch.Tensor  # (N,) min over j != y of the lower bound of f_y - f_j
    verified: torch.Tensor  # bool (N,)
    lower: torch.Tensor  # (N, K-1) lower bounds of f_y - f_j, for the containment check
    upper: torch.Tensor  # (N, K-1) upper bounds (inf where the method bounds only from below)


def specification(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C with rows e_y - e_j for every j != y: shape (N, K-1, K)."""
    eye = torch.eye(num_classes, device=y.device)
    rows = []
    for label in y.tolist():
        others = [j for j in range(num_classes) if j != label]
        rows.append(eye[label].unsqueeze(0) - eye[others])
    return torch.stack(rows)


class BoundComputer:
    """Wraps a model once; bounds the margins of batches of inputs."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], domain: Domain):
        self.lirpa = lirpa_compat.load()
        self.domain = domain
        self.model, self.input_shape = model.eval(), input_shape
        self.device = next(model.parameters(), torch.zeros(0)).device  # bound where the model lives
        self.bounded = self._wrap()

    def _wrap(self, dense_alpha: bool = False):
        options = {"verbosity": 0, "optimize_bound_args": {"iteration": 20, "lr_alpha": 0.1}}
        if dense_alpha:  # auto_LiRPA 0.3's sparse conv slopes mis-shape on convolutions: keep them dense
            options.update(sparse_features_alpha=False, sparse_spec_alpha=False,
                           sparse_conv_intermediate_bounds=False, sparse_intermediate_bounds=False)
        try:
            with warnings.catch_warnings():  # tracing warnings are expected; any other must reach the caller
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                bounded = self.lirpa.BoundedModule(
                    self.model, torch.zeros(1, *self.input_shape, device=self.device), device=str(self.device),
                    bound_opts=options,
                )
        except Exception as error:  # auto_LiRPA raises plain exceptions for unsupported operators
            raise NotBoundable(_name_layer(error)) from error
        unsound = lirpa_compat.computed_weights(bounded)
        if unsound:  # auto_LiRPA 0.3 would bound it, unsoundly: refuse rather than certify
            raise NotBoundable(f"{unsound[0]}; auto_LiRPA 0.3 bounds such a layer unsoundly (compute the weight "
                               "once, outside forward, e.g. as a parameter)")
        return bounded

    def margin_bounds(self, x: torch.Tensor, y: torch.Tensor, threat: LpBall, method: str, num_classes: int,
                      differentiable: bool = False, upper: bool = True):
        """Lower and upper bounds of f_y(x') - f_j(x') over the threat model, shape (N, K-1).
        `differentiable` keeps the graph to the weights, for certified training; `upper=False`
        skips the upper bound (inf), which training never uses and CROWN pays for twice."""
        bounded_x = self.lirpa.BoundedTensor(x, threat.perturbation(x, self.domain))
        # alpha-CROWN keeps per-neuron slopes shaped by the first batch it saw: give each batch a fresh wrapper
        bounded = self._wrap(dense_alpha=True) if method == "alpha_crown" else self.bounded
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                lower, upper = bounded.compute_bounds(
                    x=(bounded_x,), C=specification(y, num_classes), method=METHODS[method],
                    bound_upper=upper and method != "alpha_crown",  # alpha-CROWN optimises the lower bound only
                )
            if upper is None:
                upper = torch.full_like(lower, float("inf"))
        except NotImplementedError as error:  # an operator without a bound rule
            raise NotBoundable(_name_layer(error)) from error
        except (AssertionError, IndexError, RuntimeError, ValueError) as error:  # a bound rule that fails on
            raise NotBoundable(f"auto_LiRPA failed in {METHODS[method]}: {type(error).__name__}: "  # this layer
                               f"{_name_layer(error)}") from error
        if differentiable:
            return lower, upper
        return lower.detach(), upper.detach()

    def certify(self, x, y, threat: LpBall, method, num_classes, batch_size: int, tolerance: float,
                deadline: float | None = None) -> Certificate:
        """Certify batches in order; with a `deadline` (time.monotonic) stop early and certify a prefix."""
        lowers, uppers = [], []
        for start in range(0, len(x), batch_size):
            if deadline is not None and lowers and time.monotonic() > deadline:
                break
            lower, upper = self.margin_bounds(
                x[start:start + batch_size], y[start:start + batch_size], threat, method, num_classes
            )
            lowers.append(lower)
            uppers.append(upper)
        lower = torch.cat(lowers) if lowers else torch.zeros(0, num_classes - 1, device=x.device)
        upper = torch.cat(uppers) if uppers else torch.zeros(0, num_classes - 1, device=x.device)
        margin = lower.min(dim=1).values
        return Certificate(method, margin, margin > tolerance, lower, upper)


def _name_layer(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def margins_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - f_j for j != y, in the same order as :func:`specification`, shape (N, K-1)."""
    num_classes = logits.shape[1]
    return torch.einsum("nck,nk->nc", specification(y, num_classes), logits)
