"""Decide a VNNLIB property on a network: counterexample search, bounds, branch and bound.

Order (cheapest answer first): PGD with restarts on the torch form for a
counterexample; IBP and CROWN on the whole input box, then α-CROWN; then branch
and bound until the deadline: by input splitting on CROWN bounds for
low-dimensional inputs (complete there), by ReLU splitting beyond
`max_split_dims` inputs (pipeline/certify/relu_split.py: β-CROWN on ReLU
chains, auto_LiRPA with clamped bounds otherwise). Soundness rules: `unsat` only when every output
conjunct is refuted by a lower bound above `tolerance` on every box of a cover
of the input set (bounds in float64); `sat` only for a point inside the input
box whose onnxruntime outputs meet a conjunct exactly as written. Everything
else is `unknown` (methods exhausted) or `timeout`.
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager, redirect_stdout
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline import lirpa_compat
from pipeline.errors import first_line
from pipeline.vnnlib import Property, Region

UNSAT, SAT, UNKNOWN, TIMEOUT = "unsat", "sat", "unknown", "timeout"


@dataclass
class Options:
    pgd_steps: int = 50
    pgd_restarts: int = 8
    tolerance: float = 1e-6  # a float64 lower bound must clear this to count as a proof
    bab_batch: int = 256
    max_split_dims: int = 64  # beyond this many inputs, split ReLUs instead of inputs
    relu_batch: int = 64  # sub-domains bounded at once by ReLU splitting
    alpha_iterations: int = 20
    seed: int = 0


@dataclass
class Answer:
    status: str
    phase: str  # which phase decided: attack, ibp, crown, alpha_crown, bab, or why not
    x: np.ndarray | None = None  # the counterexample input (flat, float32), for sat
    y: np.ndarray | None = None  # onnxruntime's outputs at x
    seconds: float = 0.0
    boxes: int = 0  # boxes bounded by branch and bound
    notes: list[str] = field(default_factory=list)


class _Deadline(Exception):
    pass


def _violation(out: torch.Tensor, conjuncts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(N, K): for conjunct k, max over its rows of (A y - b); a point with value <= 0 meets it."""
    return torch.stack([((out @ a.t()) - b).max(dim=1).values for a, b in conjuncts], dim=1)


class Prover:
    """One network (torch form + onnxruntime judge) and one input shape; decides properties on it."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], judge: Callable[[np.ndarray], np.ndarray],
                 options: Options | None = None):
        self.options = options or Options()
        self.input_shape = tuple(input_shape)
        self.module = module.eval()
        self.module64 = _double_copy(module)
        # an ONNX torch form bounds its core (after an absorbed NHWC Transpose), on permuted boxes
        core = module.core() if hasattr(module, "core") else module
        self.bound_module64 = _double_copy(core)
        self.to_bound = module.to_core if hasattr(module, "to_core") else (lambda x: x)
        self.judge = judge
        self.lirpa = lirpa_compat.load()
        self.bound_error: str | None = None
        self._bounded = None
        self.conv_mode = "patches"  # auto_LiRPA's fast form; "matrix" where a layer has no patches rule
        self._deadline = float("inf")

    # --- entry point -------------------------------------------------------------------------
    def prove(self, prop: Property, timeout: float) -> Answer:
        start = time.monotonic()
        deadline = start + timeout
        self._deadline = deadline
        answers = []
        try:
            for region in prop.regions:
                answer = self._region(region, deadline)
                answers.append(answer)
                if answer.status == SAT:
                    break
        except _Deadline:
            answers.append(Answer(TIMEOUT, "deadline"))
        seconds = time.monotonic() - start
        sat = [a for a in answers if a.status == SAT]
        if sat:
            final = sat[0]
        elif answers and all(a.status == UNSAT for a in answers) and len(answers) == len(prop.regions):
            final = Answer(UNSAT, max((a.phase for a in answers), key=_PHASES.index))
        elif any(a.status == TIMEOUT for a in answers):
            final = Answer(TIMEOUT, "deadline")
        else:
            final = Answer(UNKNOWN, next((a.phase for a in answers if a.status == UNKNOWN), "none"))
        final.seconds = seconds
        final.boxes = sum(a.boxes for a in answers)
        final.notes = sorted({n for a in answers for n in a.notes})
        return final

    def _region(self, region: Region, deadline: float) -> Answer:
        lower = torch.as_tensor(region.lower, dtype=torch.float64)
        upper = torch.as_tensor(region.upper, dtype=torch.float64)
        conj64 = [(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
                  for a, b in region.conjuncts]
        found = self._attack(region, lower, upper, deadline)
        if found is not None:
            return found
        if self.bound_error is not None:
            return Answer(UNKNOWN, "bounds not applicable", notes=[self.bound_error])
        try:
            for method in ("ibp", "crown"):
                self._check(deadline)
                if self._refuted(self._lower_bounds(lower[None], upper[None], conj64, method), conj64).all():
                    return Answer(UNSAT, method)
        except _NotBoundable as error:
            self.bound_error = str(error)
            return Answer(UNKNOWN, "bounds not applicable", notes=[str(error)])
        notes = []
        try:
            self._check(deadline)
            if self._refuted(self._lower_bounds(lower[None], upper[None], conj64, "alpha_crown"), conj64).all():
                return Answer(UNSAT, "alpha_crown")
        except _NotBoundable as error:  # CROWN works: go on without α-CROWN, and say so
            notes.append(str(error))
        if lower.numel() > self.options.max_split_dims:
            answer = self._relu_branch_and_bound(region, lower, upper, conj64, deadline)
        else:
            answer = self._branch_and_bound(region, lower, upper, conj64, deadline)
        answer.notes += notes
        return answer

    # --- counterexample search --------------------------------------------------------------------
    def _attack(self, region: Region, lower, upper, deadline, starts: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, steps: int | None = None) -> Answer | None:
        """PGD over the whole input box, from random starts (the first of each conjunct's restarts at
        the centre) or from given `starts` aimed at the conjuncts `targets`."""
        opts = self.options
        steps = opts.pgd_steps if steps is None else steps
        conj32 = [(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
                  for a, b in region.conjuncts]
        lo, hi = lower.float(), upper.float()
        if starts is None:
            generator = torch.Generator().manual_seed(opts.seed)
            # one row of restarts per conjunct (at most 16 aimed at), the first restart at the centre
            targets = torch.arange(min(len(conj32), 16)).repeat_interleave(opts.pgd_restarts)
            x = lo + (hi - lo) * torch.rand(len(targets), lo.numel(), generator=generator)
            x[:: opts.pgd_restarts] = (lo + hi) / 2
        else:
            x = starts.float()
        step = (hi - lo) / 4
        for iteration in range(steps + 1):
            self._check(deadline)
            x = x.detach().requires_grad_(True)
            out = self._forward32(x)
            violation = _violation(out, conj32)
            met = (violation <= 0).any(dim=1)
            if met.any():
                confirmed = self._confirm(x.detach()[met], region)
                if confirmed is not None:
                    return confirmed
            if iteration == steps:
                break
            loss = violation.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(loss, x)
            decay = 0.5 * (1 + np.cos(np.pi * iteration / steps))
            x = torch.minimum(torch.maximum(x - step * decay * grad.sign(), lo), hi)
        return None

    def _forward32(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.module(flat.reshape(-1, *self.input_shape)), 1)

    def _confirm(self, candidates: torch.Tensor, region: Region) -> Answer | None:
        """The first candidate that onnxruntime confirms meets a conjunct, inside the box."""
        points = _inside(candidates.detach().double().numpy(), region.lower, region.upper)
        outputs = self.judge(points.reshape(-1, *self.input_shape)).reshape(len(points), -1).astype(np.float64)
        for point, y in zip(points, outputs):
            if not (np.all(point >= region.lower) and np.all(point <= region.upper)):
                continue  # the box is narrower than float32 can represent here
            if any(bool(np.all(a @ y <= b)) for a, b in region.conjuncts):
                return Answer(SAT, "attack", x=point, y=y)
        return None

    # --- bounds ----------------------------------------------------------------------------------
    def _wrap(self, dense: bool = False):
        options = {"verbosity": 0, "conv_mode": self.conv_mode,
                   "optimize_bound_args": {"iteration": self.options.alpha_iterations, "lr_alpha": 0.1,
                                           "stop_criterion_func": self._stop_at_deadline}}
        if dense:  # auto_LiRPA 0.3's sparse α slopes mis-shape on convolutions (as in certify/bounds.py)
            options.update(sparse_features_alpha=False, sparse_spec_alpha=False,
                           sparse_conv_intermediate_bounds=False, sparse_intermediate_bounds=False)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                example = self.to_bound(torch.zeros(1, *self.input_shape, dtype=torch.float64))
                return self.lirpa.BoundedModule(self.bound_module64, example, device="cpu", bound_opts=options)
        except Exception as error:  # auto_LiRPA raises plain exceptions for operators it cannot trace
            raise _NotBoundable(f"auto_LiRPA cannot bound this network: {first_line(error)}") from None

    def _stop_at_deadline(self, bounds: torch.Tensor):
        """α-CROWN's optimisation loop asks this after every iteration: an all-True tensor ends it
        (auto_LiRPA 0.3 then returns the best bounds so far, sound for any slopes), so one α-CROWN
        call cannot overrun the property's timeout by more than an iteration; before the deadline
        it answers False, auto_LiRPA's own default."""
        if time.monotonic() <= self._deadline:
            return False
        return torch.ones_like(bounds, dtype=torch.bool)

    def _lower_bounds(self, lower, upper, conjuncts, method: str) -> torch.Tensor:
        """(B, rows) lower bounds of A y - b over each box, all conjuncts' rows stacked. Where a layer
        has no rule for auto_LiRPA's conv patches (Transpose of an NHWC input, Mul by a per-channel
        constant), the bounds are recomputed with dense matrices: slower, same bound."""
        with _default_dtype(torch.float64):  # auto_LiRPA makes some work tensors (max pooling) at the default
            try:
                return self._lower_bounds_once(lower, upper, conjuncts, method)
            except _NotBoundable:
                if self.conv_mode != "patches":
                    raise
                self.conv_mode, self._bounded = "matrix", None
                return self._lower_bounds_once(lower, upper, conjuncts, method)

    def _lower_bounds_once(self, lower, upper, conjuncts, method: str) -> torch.Tensor:
        from auto_LiRPA.perturbations import PerturbationLpNorm

        if method == "alpha_crown":
            bounded = self._wrap(dense=True)  # α-CROWN keeps slopes shaped by the batch: a fresh wrapper each time
        else:
            self._bounded = self._bounded or self._wrap()
            bounded = self._bounded
        a = torch.cat([a for a, _ in conjuncts])
        b = torch.cat([b for _, b in conjuncts])
        def shaped(flat):
            return self.to_bound(flat.reshape(-1, *self.input_shape)).contiguous()

        centre = shaped((lower + upper) / 2)
        ptb = PerturbationLpNorm(norm=float("inf"), x_L=shaped(lower), x_U=shaped(upper))
        spec = a.unsqueeze(0).expand(len(lower), -1, -1)
        name = {"ibp": "IBP", "crown": "CROWN", "alpha_crown": "alpha-CROWN"}[method]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                with redirect_stdout(io.StringIO()):  # auto_LiRPA prints when a stop criterion ends α-CROWN
                    lb, _ = bounded.compute_bounds(x=(self.lirpa.BoundedTensor(centre, ptb),), C=spec, method=name,
                                                   bound_upper=False)
        except Exception as error:  # an operator without a bound rule
            raise _NotBoundable(f"auto_LiRPA cannot bound this network with {name}: {first_line(error)}") from None
        return lb.detach() - b

    def _refuted(self, bounds: torch.Tensor, conjuncts) -> torch.Tensor:
        """(B,) whether every conjunct has a row whose lower bound clears the tolerance on each box."""
        proven, start = [], 0
        for a, _ in conjuncts:
            rows = bounds[:, start:start + len(a)]
            proven.append((rows > self.options.tolerance).any(dim=1))
            start += len(a)
        return torch.stack(proven, dim=1).all(dim=1)

    # --- branch and bound ---------------------------------------------------------------------
    def _branch_and_bound(self, region, lower, upper, conj64, deadline) -> Answer:
        """Input splitting: bound a batch of boxes, drop the refuted, test the centres of the
        rest, split each on the input whose width times gradient is largest."""
        queue_lo, queue_hi = lower[None], upper[None]
        boxes = 0
        while len(queue_lo):
            self._check(deadline)
            take = self.options.bab_batch
            lo, hi = queue_lo[:take], queue_hi[:take]
            queue_lo, queue_hi = queue_lo[take:], queue_hi[take:]
            bounds = self._lower_bounds(lo, hi, conj64, "crown")
            boxes += len(lo)
            open_ = ~self._refuted(bounds, conj64)
            lo, hi = lo[open_], hi[open_]
            if not len(lo):
                continue
            centre = ((lo + hi) / 2).float().requires_grad_(True)
            conj32 = [(a.float(), b.float()) for a, b in conj64]
            violation = _violation(self._forward32(centre), conj32)
            met = (violation <= 0).any(dim=1)
            if met.any():
                found = self._confirm(centre.detach()[met], region)
                if found is not None:
                    found.phase, found.boxes = "bab", boxes
                    return found
            (grad,) = torch.autograd.grad(violation.min(dim=1).values.sum(), centre)
            width = hi - lo
            if (width.max(dim=1).values < 1e-9).any():
                return Answer(UNKNOWN, "bab", boxes=boxes, notes=["a box shrank below 1e-9 without a decision"])
            score = width * (grad.double().abs() + 1e-3 * width.max(dim=1, keepdim=True).values)
            dim = score.argmax(dim=1)
            rows = torch.arange(len(lo))
            mid = (lo[rows, dim] + hi[rows, dim]) / 2
            left_hi, right_lo = hi.clone(), lo.clone()
            left_hi[rows, dim] = mid
            right_lo[rows, dim] = mid
            queue_lo = torch.cat([lo, right_lo, queue_lo])
            queue_hi = torch.cat([left_hi, hi, queue_hi])
        return Answer(UNSAT, "bab", boxes=boxes)

    def _relu_branch_and_bound(self, region, lower, upper, conj64, deadline) -> Answer:
        """ReLU splitting (pipeline/certify/relu_split.py): the answer for inputs too many to split.
        Each open sub-domain's bound minimiser (a box corner, or the LP's point where the net is
        affine) seeds a short PGD over the whole box; onnxruntime confirms any hit."""
        from pipeline.certify.relu_split import ReluSplitter

        shape = self.input_shape

        def core(flat):
            return self.to_bound(flat.reshape(-1, *shape)).contiguous()

        # the core layout is a permutation of the flat input: where each core position reads from
        order = core(torch.arange(lower.numel(), dtype=torch.float64)).flatten().long()
        rows = torch.cat([a for a, _ in conj64])
        offset = torch.cat([b for _, b in conj64])
        conjunct_of_row = torch.cat([torch.full((len(a),), k) for k, (a, _) in enumerate(conj64)])

        def try_points(corners, open_rows):
            self._check(deadline)
            flat = torch.empty(len(corners), lower.numel(), dtype=torch.float64)
            flat[:, order] = corners.flatten(1)
            # aim each start at a conjunct not yet refuted on its sub-domain (its first open row's)
            targets = conjunct_of_row[open_rows.double().argmax(dim=1)]
            return self._attack(region, lower, upper, deadline, starts=flat, targets=targets, steps=10)

        def out_of_time():
            return time.monotonic() > deadline

        with _default_dtype(torch.float64):
            try:
                splitter = ReluSplitter(self._wrap(dense=True), self.lirpa, tuple(core(lower).shape[1:]),
                                        tolerance=self.options.tolerance, iterations=self.options.alpha_iterations)
                outcome = splitter.decide(core(lower), core(upper), rows[None], offset,
                                          lambda bounds: self._refuted(bounds, conj64), try_points, out_of_time,
                                          batch=self.options.relu_batch)
            except _Deadline:
                raise
            except Exception as error:  # auto_LiRPA cannot wrap or bound it under split bounds: say so, never guess
                return Answer(UNKNOWN, "relu_bab", notes=[f"ReLU splitting failed: {first_line(error)}"])
        if outcome.status == "verified":
            return Answer(UNSAT, "relu_bab", boxes=outcome.domains)
        if outcome.status == "found":
            found = outcome.found
            found.phase, found.boxes = "relu_bab", outcome.domains
            return found
        if outcome.status == "deadline":
            raise _Deadline
        return Answer(UNKNOWN, "relu_bab", boxes=outcome.domains, notes=[outcome.note])

    def _check(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise _Deadline


class _NotBoundable(Exception):
    pass


_PHASES = ["attack", "ibp", "crown", "alpha_crown", "bab", "relu_bab"]


@contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _double_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double().eval()


def _inside(points: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """float32 points inside [lower, upper] as the reals the VNNLIB wrote (rounding nudged inwards)."""
    x = np.clip(points, lower, upper).astype(np.float32)
    below = x.astype(np.float64) < lower
    x[below] = np.nextafter(x[below], np.float32(np.inf))
    above = x.astype(np.float64) > upper
    x[above] = np.nextafter(x[above], np.float32(-np.inf))
    return x

