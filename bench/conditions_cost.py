"""Triggering conditions, measured in one run on digits and (with --mnist) on the MNIST test split in
../shared/data/mnist:

* the empirical search's cost per condition against two floors: (a) the same number of transformed
  copies (random parameters, transform, forward) in plain batched forwards, the issue's floor; and
  (b) the compute floor, which charges each copy the search evaluated with a gradient a plain batched
  forward + backward instead (a gradient cannot cost less). The goal is >= 0.9 of the floor;
* for brightness + contrast, the share certified by CROWN branch and bound against the share the
  search leaves robust: the gap is what remains unknown.

Writes bench/results/conditions_<data>.md (with --cost-only: conditions_cost_digits.md and, when the
MNIST files are there, conditions_cost_mnist.md, the cost tables only). The models are small CNNs
trained here for seconds (standard training): the figures speak of the method's cost and gap, not
of a release model.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch

from pipeline.conditions.certify import branch_and_bound
from pipeline.conditions.search import search
from pipeline.conditions.threats import from_config
from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.models import cnn_small
from pipeline.threat import Domain

REPO = Path(__file__).resolve().parents[1]
THREATS = {
    "brightness": {"kind": "brightness", "range": [-0.1, 0.1]},
    "brightness_contrast": {"kind": "brightness_contrast", "brightness": [-0.1, 0.1], "contrast": [0.8, 1.2]},
    "gamma": {"kind": "gamma", "range": [0.8, 1.25]},
    "fog": {"kind": "fog", "range": [0.0, 0.2]},
    "noise": {"kind": "noise", "sigma": 0.1},
    "blur": {"kind": "blur", "range": [0.0, 1.0]},
    "rotation": {"kind": "rotation", "range": [-10.0, 10.0]},
    "scaling": {"kind": "scaling", "range": [0.9, 1.1]},
    "translation": {"kind": "translation", "pixels": 1},
    "occlusion": {"kind": "occlusion", "size": 3, "stride": 2},
}


def train(data, epochs: int, batch: int = 128):
    torch.manual_seed(0)
    x, y = torch.as_tensor(data.x["train"]), torch.as_tensor(data.y["train"])
    model = cnn_small(tuple(x.shape[1:]), data.num_classes, channels=(16, 32), dense=100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


REPEATS = 5
GOAL = 0.9
ESTIMATORS = ("autograd", "differences")  # each descended condition is timed with both


def gradient_floor(model, x, condition, domain, total: int, batch: int) -> float:
    """Plain batched forward + backward to the parameters of `total` transformed copies (random
    parameters, samples in turn): what that many gradient copies cost with no search around them."""
    generator = torch.Generator().manual_seed(0)
    low, high = condition.box()
    started = time.perf_counter()
    for start in range(0, total, batch):
        rows = torch.arange(start, min(start + batch, total)) % len(x)
        theta = (low + torch.rand(len(rows), condition.dims, generator=generator) * (high - low)).requires_grad_(True)
        torch.autograd.grad(model(condition.transform(x[rows], theta, domain)).amax(dim=1).sum(), theta)
    return time.perf_counter() - started


def floor(model, x, condition, domain, total: int, batch: int) -> float:
    """Plain batched forwards of `total` transformed copies (random parameters, samples in turn), in full
    batches of `batch`: what the same number of copies costs with no search around it."""
    generator = torch.Generator().manual_seed(0)
    low, high = condition.box()
    finite = condition.finite_set()
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, total, batch):
            rows = torch.arange(start, min(start + batch, total)) % len(x)
            theta = low + torch.rand(len(rows), condition.dims, generator=generator) * (high - low)
            if finite is not None:
                theta = torch.as_tensor(finite)[torch.randint(len(finite), (len(rows),), generator=generator)]
            noise = torch.randn((len(rows),) + tuple(x.shape[1:]), generator=generator) if condition.stochastic else None
            model(condition.transform(x[rows], theta, domain, noise)).argmax(1)
    return time.perf_counter() - started


def cost_table(model, x, y, domain, cfg) -> list[str]:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"_Measured by `python bench/conditions_cost.py{''.join(' ' + a for a in sys.argv[1:])}`, {when}, torch {torch.__version__}, load "
             f"average {os.getloadavg()[0]:.1f} at the start._", "",
             f"{len(y)} test samples, {torch.get_num_threads()} threads, conditions.batch_size {cfg.batch_size}. "
             f"Search: grid {cfg.search.grid}, random {cfg.search.random}, gradient steps {cfg.search.steps}. "
             "Gradient = how the descent takes d margin/dθ: autograd (a backward pass) or differences (its sign "
             "from a forward difference, one more copy per parameter axis); - = no descent. "
             "Evaluated = transformed copies the search actually evaluated (a sample leaves once broken, the "
             "descent once it repeats a point), gradient/sample = of which with a backward pass. Forward floor = plain "
             "batched forwards of all evaluated copies; compute floor = plain forwards of the forward copies plus "
             f"plain forward + backward of the gradient copies. Ratio = floor / search (goal >= {GOAL}). Minimum of "
             f"{REPEATS} interleaved repeats.", "",
             "| condition | gradient | budget/sample | evaluated/sample | gradient/sample | search s | forward floor s | "
             "ratio | compute floor s | ratio | robust (upper bound) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    shape = tuple(x.shape[1:])
    ratios = {}
    for key in THREATS:
        condition = from_config(key, cfg.threats[key], shape)
        condition.check(domain, shape, key)
        for estimator in ESTIMATORS if condition.differentiable else ("-",):
            settings = cfg.search if estimator == "-" else cfg.search.model_copy(update={"gradient": estimator})
            best = forward = compute = float("inf")
            outcome = None
            for _ in range(REPEATS):  # interleaved, minimum of each: a loaded machine slows both alike at best
                started = time.perf_counter()
                outcome = search(model, x, y, condition, domain, settings, torch.Generator().manual_seed(0),
                                 cfg.batch_size)
                best = min(best, time.perf_counter() - started)
                forward = min(forward, floor(model, x, condition, domain, outcome.copies_evaluated, cfg.batch_size))
                gradients = outcome.gradient_copies
                compute = min(compute, floor(model, x, condition, domain, outcome.copies_evaluated - gradients,
                                             cfg.batch_size)
                              + (gradient_floor(model, x, condition, domain, gradients, cfg.batch_size) if gradients
                                 else 0))
            n = len(x)
            lines.append(f"| {key} | {estimator} | {outcome.copies_per_sample} | {outcome.copies_evaluated / n:.1f} | "
                         f"{outcome.gradient_copies / n:.2f} | {best:.4f} | {forward:.4f} | {forward / best:.2f} | "
                         f"{compute:.4f} | {compute / best:.2f} | {float(outcome.robust.float().mean()):.3f} |")
            print(lines[-1], flush=True)
            ratios[(key, estimator)] = (forward / best, compute / best, outcome.robust)
    return lines + ["", *cost_conclusion(ratios)]


def cost_conclusion(ratios: dict[tuple[str, str], tuple[float, float, torch.Tensor]]) -> list[str]:
    """What the table says about the 0.9 goal, computed from it: per (condition, gradient estimator, "-"
    where the search takes no gradient) the forward-floor ratio, the compute-floor ratio and the per-sample
    robust verdicts."""
    def span(values):
        return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    lines = []
    for estimator, what in (("autograd", "with gradients by a backward pass"),
                            ("differences", "with gradient signs by forward differences")):
        rows = {k: v for k, v in ratios.items() if k[1] in (estimator, "-")}
        if not any(k[1] == estimator for k in rows):
            continue
        met = [k[0] for k, (forward, _, _) in rows.items() if forward >= GOAL]
        searched = [v for k, v in rows.items() if k[1] == estimator]
        lines.append(f"Searching {what}: goal (search >= {GOAL} of the forward floor) met by {len(met)} of "
                     f"{len(rows)} conditions" + (f" ({', '.join(met)})" if met else "") + "; the descended "
                     f"conditions reach {span([v[0] for v in searched])} of the forward floor and "
                     f"{span([v[1] for v in searched])} of the compute floor.")
    plain = [v for k, v in ratios.items() if k[1] == "-"]
    if plain:
        lines.append(f"Searches without a descent reach {span([v[0] for v in plain])} of the forward floor.")
    pairs = [(k[0], ratios[k][2], ratios[(k[0], "differences")][2]) for k in ratios
             if k[1] == "autograd" and (k[0], "differences") in ratios]
    if pairs:
        differ = {name: int((a != d).sum()) for name, a, d in pairs if bool((a != d).any())}
        total = sum(len(a) for _, a, _ in pairs)
        lines.append("Per-sample verdicts of the two estimators: " + (
            f"the same for all {total} (condition, sample) pairs." if not differ else
            "differ on " + ", ".join(f"{n} samples of {name}" for name, n in differ.items()) + f" (of {total})."))
    return lines


def run(name: str, data, epochs: int, samples: int, bound_batch: int = 256,
        certified=("brightness", "brightness_contrast", "gamma", "fog"), budgets=(8, 64)) -> str:
    model = train(data, epochs)
    x, y = torch.as_tensor(data.x["test"][:samples]), torch.as_tensor(data.y["test"][:samples])
    domain = Domain.from_arrays(data.lower, data.upper)
    shape = tuple(x.shape[1:])
    params = parse_params({"conditions": {"threats": {k: {**v, "rationale": "bench"} for k, v in THREATS.items()}}})
    cfg = params.conditions
    lines = [f"# Triggering conditions on {name}", "", f"cnn_small trained {epochs} epochs (standard).",
             *cost_table(model, x, y, domain, cfg)]
    if not certified:
        return "\n".join(lines) + "\n"
    lines += ["", "Certified (CROWN, branch and bound over the parameter box) against the search's robust share:", "",
              "| condition | max boxes | robust (upper) | certified (lower) | unknown gap | boxes | seconds |",
              "|---|---|---|---|---|---|---|"]
    gaps: dict[int, dict[str, float]] = {}
    for key in certified:
        condition = from_config(key, cfg.threats[key], shape)
        outcome = search(model, x, y, condition, domain, cfg.search, torch.Generator().manual_seed(0), cfg.batch_size)
        for max_boxes in budgets:
            settings = cfg.certify.model_copy(update={"max_boxes": max_boxes, "batch_size": bound_batch})
            bab = branch_and_bound(model, x, y, condition, domain, data.num_classes, settings)
            robust = outcome.robust & ~bab.counterexample
            certified = bab.verified & outcome.clean_correct
            r, c = float(robust.float().mean()), float(certified.float().mean())
            lines.append(f"| {key} | {max_boxes} | {r:.3f} | {c:.3f} | {r - c:.3f} | {bab.boxes} | {bab.seconds:.1f} |")
            print(lines[-1], flush=True)
            gaps.setdefault(max_boxes, {})[key] = r - c
    lines += ["", gap_conclusion(gaps)]
    return "\n".join(lines) + "\n"


def gap_conclusion(gaps: dict[int, dict[str, float]]) -> str:
    """The unknown share (robust upper bound minus certified lower bound) per box budget, from the table."""
    parts = []
    for budget, by_condition in gaps.items():
        worst = max(by_condition, key=by_condition.get)
        parts.append(f"at {budget} boxes per sample the largest unknown gap is {by_condition[worst]:.3f} ({worst})"
                     if by_condition[worst] > 0 else f"at {budget} boxes per sample no condition leaves a sample unknown")
    return "Certified against robust: " + "; ".join(parts) + "."


def main() -> None:
    out = REPO / "bench" / "results"
    cost_only = "--cost-only" in sys.argv  # the cost tables alone (no certification)
    mnist_files = REPO.parent / "shared" / "data" / "mnist"
    if "--mnist-only" not in sys.argv:
        digits = prepare(load_dataset("digits"), 0.15, 0.25, seed=0)
        (out / ("conditions_cost_digits.md" if cost_only else "conditions_digits.md")).write_text(
            run("digits", digits, epochs=30, samples=450, certified=() if cost_only else
                ("brightness", "brightness_contrast", "gamma", "fog")))
    if "--mnist" in sys.argv or "--mnist-only" in sys.argv or (cost_only and mnist_files.is_dir()):
        # CROWN in matrix mode keeps (batch x neurons x 784) coefficients: small bound batches on 28x28
        mnist = prepare(load_dataset("idx", mnist_files), 0.1, 0.2, seed=0)
        (out / ("conditions_cost_mnist.md" if cost_only else "conditions_mnist.md")).write_text(
            run("MNIST (t10k split)", mnist, epochs=3, samples=200, bound_batch=16,
                certified=() if cost_only else ("brightness_contrast",), budgets=(8, 32)))


if __name__ == "__main__":
    main()
