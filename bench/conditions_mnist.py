"""The certified-vs-robust gap for brightness + contrast on MNIST (../shared/data/mnist, the t10k split),
after branch and bound over the parameter box. One run; writes bench/results/conditions_mnist_bab.md.

Why the earlier attempt did not finish: CROWN on (θ, x) ↦ f(T(x, θ)) computes every intermediate bound
with one backward pass per neuron (matrix mode: an identity of 1568-3136 rows per convolution on 28x28),
though θ has two dimensions. Brightness and contrast are affine in θ before the clipping, so the
transform folds into nn.Linear(2 → 784) per input (pipeline/conditions/certify.py `_Folded`) and
forward-mode bounds carry three coefficients per neuron; CROWN runs only for the 9 output margins.

    PYTHONPATH=$PWD python bench/conditions_mnist.py [--samples 200] [--epochs 3] [--max-boxes 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.conditions_cost import train
from pipeline.conditions.certify import _bound, branch_and_bound
from pipeline.conditions.search import search
from pipeline.conditions.threats import from_config
from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.stats import clopper_pearson
from pipeline.threat import Domain

REPO = Path(__file__).resolve().parents[1]


def crown_unfolded_seconds(model, x, y, condition, domain, boxes: int = 4) -> float:
    """CROWN (matrix mode) on the unfolded composed module, the full box of `boxes` samples: the old cost."""
    low, high = condition.box()
    started = time.perf_counter()
    _bound(model, condition, x[:boxes], y[:boxes], low.expand(boxes, -1).clone(), high.expand(boxes, -1).clone(),
           domain, 10)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-boxes", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "conditions_mnist_bab.md"))
    args = parser.parse_args()
    mnist = prepare(load_dataset("idx", REPO.parent / "shared" / "data" / "mnist"), 0.1, 0.2, seed=0)
    model = train(mnist, args.epochs)
    x, y = torch.as_tensor(mnist.x["test"][:args.samples]), torch.as_tensor(mnist.y["test"][:args.samples])
    domain = Domain.from_arrays(mnist.lower, mnist.upper)
    spec = {"kind": "brightness_contrast", "brightness": [-0.1, 0.1], "contrast": [0.8, 1.2], "rationale": "bench"}
    cfg = parse_params({"conditions": {"threats": {"bc": spec},
                                       "certify": {"method": "forward_crown", "max_boxes": args.max_boxes,
                                                   "batch_size": 256}}}).conditions
    condition = from_config("bc", cfg.threats["bc"], tuple(x.shape[1:]))
    started = time.perf_counter()
    outcome = search(model, x, y, condition, domain, cfg.search, torch.Generator().manual_seed(0), cfg.batch_size)
    search_seconds = time.perf_counter() - started
    bab = branch_and_bound(model, x, y, condition, domain, mnist.num_classes, cfg.certify)
    robust = outcome.robust & ~bab.counterexample
    certified = bab.verified & outcome.clean_correct
    assert not (certified & ~robust).any(), "a certified sample was broken: soundness violation"
    n = len(y)
    r, c = int(robust.sum()), int(certified.sum())
    undecided = int((robust & ~certified).sum())
    unfolded = crown_unfolded_seconds(model, x, y, condition, domain)
    folded_started = time.perf_counter()
    low, high = condition.box()
    from pipeline.conditions.certify import FoldedBounds

    FoldedBounds(model, condition, domain, 10, tuple(x.shape[1:]))(
        x[:4], y[:4], torch.arange(4), low.expand(4, -1).clone(), high.expand(4, -1).clone())
    folded = time.perf_counter() - folded_started

    def ci(k):
        lo, hi = clopper_pearson(k, n)
        return f"[{lo:.3f}, {hi:.3f}]"

    lines = [
        "# Brightness + contrast on MNIST: certified vs robust after branch and bound", "",
        f"{n} MNIST test images (t10k split of ../shared/data/mnist, prepare seed 0), cnn_small (16, 32, dense 100) "
        f"trained {args.epochs} epochs with plain cross-entropy here (bench/conditions_cost.py `train`), "
        f"{torch.get_num_threads()} threads. Condition: brightness ∈ [-0.1, 0.1], contrast ∈ [0.8, 1.2], clipped to "
        "[0, 1]. Search: grid 9x9, 16 random, 10 gradient steps. Certification: `conditions.certify.method: "
        f"forward_crown`, branch and bound up to {args.max_boxes} boxes per sample.", "",
        "| clean | robust (search, upper bound) | certified (lower bound) | gap (unknown) | boxes | rounds | BaB s | search s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {float(outcome.clean_correct.float().mean()):.3f} | {r / n:.3f} {ci(r)} | {c / n:.3f} {ci(c)} | "
        f"{undecided / n:.3f} ({undecided} samples) | {bab.boxes} | {bab.rounds} | {bab.seconds:.1f} | "
        f"{search_seconds:.1f} |", "",
        f"Counter-examples branch and bound found that the search missed: {int((bab.counterexample & outcome.robust).sum())}. "
        f"Budget exhausted: {bab.budget_exhausted}.", "",
        f"Cost of one bound over the full box for 4 samples: CROWN on the unfolded module (matrix mode) "
        f"{unfolded:.1f} s; folded forward mode + CROWN margins {folded:.2f} s (includes tracing once).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
