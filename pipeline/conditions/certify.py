"""What can be proven about a condition, and the cross-check that keeps the proof honest.

Two complete or sound methods:

* enumeration, for finite parameter sets (integer translations, patch positions on a stride):
  a sample is certified when every element is classified correctly. Complete for that set,
  and only for it (patch positions between the stride's are not covered).
* bound propagation over the parameter box: the transform and the network are one module whose
  input is the low-dimensional parameter vector θ (`forward_crown`: for transforms affine in θ
  before clipping, folded into a linear layer of θ and bounded in forward mode, see `_Folded`);
  auto_LiRPA (CROWN) bounds the margin
  f_y − f_j over the box, and the box is split along its widest axis (branch and bound) until
  every piece is verified, a piece's centre is misclassified (a counter-example), or the
  sample's box budget ends (unknown: not counted). Sound for the transform as the search
  evaluates it, including the clipping to the data domain.

The empirical search's failures are checked against every certificate: a certified sample with a
failure found is a :class:`~pipeline.errors.SoundnessViolation`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import lirpa_compat
from pipeline.certify.bounds import NotBoundable, specification
from pipeline.conditions.search import margin_and_prediction
from pipeline.conditions.threats import Condition
from pipeline.errors import SoundnessViolation
from pipeline.threat import Domain


class _Composed(nn.Module):
    """(θ, x) ↦ model(T(x, θ)), one row of θ per row of x. x is a second, unperturbed input (auto_LiRPA
    takes buffers to be shared across the batch, so a per-sample constant must be an input)."""

    def __init__(self, model: nn.Module, condition: Condition, domain: Domain):
        super().__init__()
        self.model, self.condition, self.domain = model, condition, domain

    def forward(self, theta, x):
        return self.model(self.condition.transform(x, theta, self.domain))


@dataclass
class BoundsOutcome:
    verified: torch.Tensor  # (N,) bool
    counterexample: torch.Tensor  # (N,) bool: a box centre misclassified (an empirical failure)
    counter_theta: torch.Tensor  # (N, d)
    boxes: int  # boxes bounded in all
    rounds: int
    budget_exhausted: bool
    seconds: float


def _bound(model, condition, x, y, low, high, domain, num_classes) -> torch.Tensor:
    """Lower bounds of f_y − f_j over each row's box [low, high], shape (B, K−1)."""
    if getattr(model, "not_boundable", None):  # a supplied model without a boundable form (pipeline.supplied)
        raise NotBoundable(model.not_boundable)
    lirpa = lirpa_compat.load()
    from auto_LiRPA.perturbations import PerturbationLpNorm

    centre = (low + high) / 2
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            bounded = lirpa.BoundedModule(_Composed(model, condition, domain), (centre, x), device=str(x.device),
                                          bound_opts={"verbosity": 0, "conv_mode": "matrix"})
            unsound = lirpa_compat.computed_weights(bounded)
            if unsound:  # auto_LiRPA 0.3 would bound it unsoundly (see lirpa_compat.computed_weights)
                raise NotImplementedError(f"{unsound[0]}; auto_LiRPA 0.3 bounds such a layer unsoundly")
            theta = lirpa.BoundedTensor(centre, PerturbationLpNorm(norm=float("inf"), x_L=low, x_U=high))
            lower, _ = bounded.compute_bounds(x=(theta, x), C=specification(y, num_classes), method="CROWN",
                                              bound_upper=False)
    except NotImplementedError as error:
        raise NotBoundable(str(error).splitlines()[0] if str(error) else type(error).__name__) from error
    return lower.detach()


class _Folded(nn.Module):
    """θ ↦ model(clip(W θ + c)) for ONE input whose transform is affine in θ before the clipping (brightness,
    contrast, both, fog): the parameter-to-image map is an nn.Linear(d → pixels) whose weights are that input's
    design, so every box of the input is one batch row. With d = 1 or 2 parameters, forward-mode bound
    propagation carries d + 1 coefficients per neuron where CROWN's intermediate bounds carry one row per
    neuron of every earlier layer (an identity of thousands of rows per convolution on 28x28)."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], dims: int, domain: Domain):
        super().__init__()
        self.model, self.shape = model, tuple(shape)
        self.linear = nn.Linear(dims, int(torch.Size(shape).numel()))
        self.register_buffer("lower", domain.lower.reshape(1, -1).clone())
        self.register_buffer("upper", domain.upper.reshape(1, -1).clone())

    def forward(self, theta):
        z = self.linear(theta)
        z = self.lower + F.relu(z - self.lower)  # the clipping of Condition.transform, as ReLUs
        z = self.upper - F.relu(self.upper - z)
        return self.model(z.view(-1, *self.shape))


class FoldedBounds:
    """Lower margin bounds over parameter boxes through :class:`_Folded`: one traced module, re-loaded with each
    input's design (W, c); intermediate bounds by forward mode, the margins by a CROWN backward pass."""

    def __init__(self, model, condition: Condition, domain: Domain, num_classes: int, shape):
        self.folded = _Folded(model, shape, condition.dims, domain).to(domain.lower.device)
        self.condition, self.domain, self.num_classes = condition, domain, num_classes
        self.bounded = None

    def __call__(self, x, y, owner, low, high) -> torch.Tensor:
        lirpa = lirpa_compat.load()
        from auto_LiRPA.perturbations import PerturbationLpNorm

        weight, offset = self.condition.affine_design(x, self.domain)
        lower = torch.empty(len(x), self.num_classes - 1, device=x.device)
        for sample in owner.unique().tolist():
            rows = torch.nonzero(owner == sample).flatten()
            with torch.no_grad():
                self.folded.linear.weight.copy_(weight[rows[0]])
                self.folded.linear.bias.copy_(offset[rows[0]])
            centre = (low[rows] + high[rows]) / 2
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore")
                    if self.bounded is None:
                        self.bounded = lirpa.BoundedModule(self.folded, (centre,), device=str(x.device),
                                                           bound_opts={"verbosity": 0})
                    else:
                        self.bounded.load_state_dict(self.folded.state_dict())
                    theta = lirpa.BoundedTensor(centre, PerturbationLpNorm(norm=float("inf"), x_L=low[rows],
                                                                           x_U=high[rows]))
                    bound, _ = self.bounded.compute_bounds(x=(theta,), C=specification(y[rows], self.num_classes),
                                                           method="forward+backward", bound_upper=False)
            except NotImplementedError as error:
                raise NotBoundable(str(error).splitlines()[0] if str(error) else type(error).__name__) from error
            lower[rows] = bound.detach()
        return lower


def branch_and_bound(model, x, y, condition: Condition, domain: Domain, num_classes: int, cfg) -> BoundsOutcome:
    """Certify each sample of (x, y) over the whole parameter box by CROWN with input splitting."""
    started = time.perf_counter()
    deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
    n, device = len(x), x.device
    full_low, full_high = condition.box(device)
    span = (full_high - full_low).clamp_min(1e-12)
    owner = torch.arange(n, device=device)
    low, high = full_low.expand(n, -1).clone(), full_high.expand(n, -1).clone()
    open_boxes = torch.ones(n, dtype=torch.long, device=device)  # undecided boxes per sample
    used = torch.ones(n, dtype=torch.long, device=device)
    given_up = torch.zeros(n, dtype=torch.bool, device=device)
    counterexample = torch.zeros(n, dtype=torch.bool, device=device)
    counter_theta = torch.zeros(n, condition.dims, device=device)
    boxes = rounds = 0
    exhausted = False
    folded = None
    if getattr(cfg, "method", "crown") == "forward_crown":
        if condition.affine_design(x[:1], domain) is None:
            raise NotBoundable(f"conditions.certify.method 'forward_crown' needs a transform affine in its "
                               f"parameters; {condition.kind} is not")
        folded = FoldedBounds(model, condition, domain, num_classes, tuple(x.shape[1:]))
    while len(owner):
        if deadline is not None and rounds and time.monotonic() > deadline:
            exhausted = True
            given_up[owner] = True
            break
        rounds += 1
        keep_low, keep_high, keep_owner = [], [], []
        for start in range(0, len(owner), cfg.batch_size):
            part = slice(start, start + cfg.batch_size)
            o, lo, hi = owner[part], low[part], high[part]
            lower = (folded(x[o], y[o], o, lo, hi) if folded is not None
                     else _bound(model, condition, x[o], y[o], lo, hi, domain, num_classes))
            boxes += len(o)
            proven = lower.min(dim=1).values > cfg.tolerance
            with torch.no_grad():
                centre = (lo + hi) / 2
                _, prediction = margin_and_prediction(model(condition.transform(x[o], centre, domain)), y[o])
            wrong = prediction != y[o]
            counter_theta[o[wrong]] = centre[wrong]
            counterexample[o[wrong]] = True
            open_boxes.index_add_(0, o[proven], -torch.ones_like(o[proven]))
            split = ~proven & ~wrong
            keep_low.append(lo[split])
            keep_high.append(hi[split])
            keep_owner.append(o[split])
        owner, low, high = torch.cat(keep_owner), torch.cat(keep_low), torch.cat(keep_high)
        alive = ~counterexample[owner] & ~given_up[owner]
        owner, low, high = owner[alive], low[alive], high[alive]
        over = used[owner] + 1 > cfg.max_boxes  # splitting a box adds one
        if over.any():
            exhausted = True
            given_up[owner[over]] = True
            alive = ~given_up[owner]
            owner, low, high = owner[alive], low[alive], high[alive]
        if not len(owner):
            break
        axis = ((high - low) / span).argmax(dim=1)  # widest axis relative to the full range
        middle = ((low + high) / 2).gather(1, axis[:, None]).squeeze(1)
        left_high, right_low = high.clone(), low.clone()
        left_high.scatter_(1, axis[:, None], middle[:, None])
        right_low.scatter_(1, axis[:, None], middle[:, None])
        owner = torch.cat([owner, owner])
        low, high = torch.cat([low, right_low]), torch.cat([left_high, high])
        used.index_add_(0, owner[: len(owner) // 2], torch.ones(len(owner) // 2, dtype=torch.long, device=device))
        open_boxes.index_add_(0, owner[: len(owner) // 2], torch.ones(len(owner) // 2, dtype=torch.long, device=device))
    verified = (open_boxes == 0) & ~counterexample & ~given_up
    return BoundsOutcome(verified, counterexample, counter_theta, boxes, rounds, exhausted,
                         time.perf_counter() - started)


def cross_check(certified: torch.Tensor, empirically_broken: torch.Tensor, condition: Condition, method: str) -> int:
    """No certified sample may have a failure the search found; returns the samples cross-checked."""
    conflicts = int((certified & empirically_broken).sum())
    if conflicts:
        raise SoundnessViolation(f"{conflicts} sample(s) certified by {method} under condition {condition.name!r} "
                                 "have a failure found by the empirical search; the certificate cannot be trusted")
    return len(certified)
