"""Training for a condition against plain augmentation (issue 16 §4), on digits, one run: each
model is trained with the same epochs and optimiser, then evaluated by the conditions stage's own
worst-case search over the same range. Goal: training for the condition beats plain augmentation
on the condition's worst case. Writes bench/results/conditions_training_digits.md.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.conditions.search import search
from pipeline.conditions.threats import from_config
from pipeline.conditions.training import augmented, worst_of_k
from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.models import cnn_small
from pipeline.threat import Domain

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = {"rotation": {"kind": "rotation", "range": [-20.0, 20.0]},
              "translation": {"kind": "translation", "pixels": 1},
              "photometric": {"kind": "brightness_contrast", "brightness": [-0.3, 0.3], "contrast": [0.5, 1.5]}}
METHODS = {
    "standard": None,
    "augmentation": lambda m, x, y, c, d, g: augmented(m, x, y, c, d, g),
    "worst_of_8": lambda m, x, y, c, d, g: worst_of_k(m, x, y, c, d, g, k=8),
    "worst_of_4_then_3_ascent": lambda m, x, y, c, d, g: worst_of_k(m, x, y, c, d, g, k=4, steps=3),
}


def train(data, condition, domain, batch_fn, epochs: int = 30, batch: int = 64):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.as_tensor(data.x["train"]), torch.as_tensor(data.y["train"])
    model = cnn_small(tuple(x.shape[1:]), data.num_classes, channels=(16, 32), dense=100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, yb = x[idx], y[idx]
            if batch_fn is not None:  # half clean, half under the condition
                xb = torch.cat([xb, batch_fn(model, xb, yb, condition, domain, generator)])
                yb = torch.cat([yb, yb])
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0)
    domain = Domain.from_arrays(data.lower, data.upper)
    shape = tuple(data.x["test"].shape[1:])
    params = parse_params({"conditions": {"threats": {k: {**v, "rationale": "bench"} for k, v in CONDITIONS.items()}}})
    x, y = torch.as_tensor(data.x["test"]), torch.as_tensor(data.y["test"])
    lines = ["# Training for a condition against plain augmentation (digits)", "",
             f"cnn_small, 30 epochs, Adam 2e-3, half of each batch clean and half under the condition; worst case "
             f"by the conditions stage's search (grid {params.conditions.search.grid}, random "
             f"{params.conditions.search.random}, gradient steps {params.conditions.search.steps}) on "
             f"{len(y)} test samples.", "",
             "| condition | training | clean | robust (worst case found) | train s |", "|---|---|---|---|---|"]
    for name in CONDITIONS:
        condition = from_config(name, params.conditions.threats[name], shape)
        for method, batch_fn in METHODS.items():
            started = time.perf_counter()
            model = train(data, condition, domain, batch_fn)
            seconds = time.perf_counter() - started
            outcome = search(model, x, y, condition, domain, params.conditions.search,
                             torch.Generator().manual_seed(0), 512)
            lines.append(f"| {name} | {method} | {float(outcome.clean_correct.float().mean()):.3f} | "
                         f"{float(outcome.robust.float().mean()):.3f} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    (REPO / "bench" / "results" / "conditions_training_digits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
