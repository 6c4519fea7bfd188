"""`robustgate prove` on MNIST: ReLU MLPs (2, 4, 6 hidden layers x 256) and a small CNN, trained
here on the MNIST file in ../shared/data/mnist (t10k: first 8000 to train, the rest to test),
exported to ONNX, with L∞ robustness properties at ε in {0.02, 0.05} around test images.

Counts unsat / sat / unknown / timeout and the seconds per answer, and the cost of one CROWN
bound through the prover against bare auto_LiRPA on the same network and box.

    PYTHONPATH=. python bench/prove_bench.py [--images 2] [--timeout 60] [--epochs 1]
    PYTHONPATH=. python bench/prove_bench.py --only mlp4x256:1:0.02   # one instance, nothing written
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import lirpa_compat, vnnlib  # noqa: E402
from pipeline.models import cnn_small  # noqa: E402
from pipeline.prove_cli import load_network, prove_files  # noqa: E402


def load_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(depth):
        layers += [nn.Linear(width, 256), nn.ReLU()]
        width = 256
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            batch = order[i:i + 128]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return net.eval()


def bound_cost(model_path: Path, x0: np.ndarray, epsilon: float, label: int, repeats: int = 10) -> dict:
    """Seconds for one CROWN bound: through the prover vs bare auto_LiRPA on the same module and box."""
    from auto_LiRPA.perturbations import PerturbationLpNorm

    loaded = load_network(model_path)
    prover = loaded.prover
    flat = torch.as_tensor(x0.reshape(1, -1), dtype=torch.float64)
    lower, upper = (flat - epsilon).clamp(0, 1), (flat + epsilon).clamp(0, 1)
    a = torch.eye(10, dtype=torch.float64)[[label]] - torch.eye(10, dtype=torch.float64)[[j for j in range(10) if j != label]]
    conj = [(a, torch.zeros(9, dtype=torch.float64))]
    prover._lower_bounds(lower, upper, conj, "crown")  # build once
    start = time.perf_counter()
    for _ in range(repeats):
        ours = prover._lower_bounds(lower, upper, conj, "crown")
    ours_s = (time.perf_counter() - start) / repeats
    lirpa = lirpa_compat.load()
    shape = (1, *prover.input_shape)
    torch.set_default_dtype(torch.float64)
    try:
        bare = lirpa.BoundedModule(prover.bound_module64, torch.zeros(*shape), device="cpu",
                                   bound_opts={"verbosity": 0, "conv_mode": prover.conv_mode})
        def query():  # what any caller does per box: the perturbation, the bounded tensor, the bound
            ptb = PerturbationLpNorm(norm=float("inf"), x_L=lower.reshape(shape), x_U=upper.reshape(shape))
            x = lirpa.BoundedTensor(((lower + upper) / 2).reshape(shape), ptb)
            return bare.compute_bounds(x=(x,), C=a[None], method="CROWN", bound_upper=False)[0]

        query()
        start = time.perf_counter()
        for _ in range(repeats):
            theirs = query()
        bare_s = (time.perf_counter() - start) / repeats
    finally:
        torch.set_default_dtype(torch.float32)
    return {"prover_s": ours_s, "bare_auto_lirpa_s": bare_s, "ratio": ours_s / bare_s,
            "same_bound": bool(torch.allclose(ours.reshape(-1), theirs.reshape(-1), atol=1e-9))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prove_bench.json"))
    parser.add_argument("--only", default=None, metavar="MODEL:IMAGE:EPSILON",
                        help="run this one instance (e.g. mlp4x256:1:0.02) and print it; nothing is written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, labels = load_mnist(Path(args.mnist))
    x_train, y_train, x_test, y_test = images[:8000], labels[:8000], images[8000:], labels[8000:]
    torch.manual_seed(0)  # the initial weights too: same numbers on every run
    models = {"mlp2x256": mlp(2), "mlp4x256": mlp(4), "mlp6x256": mlp(6), "cnn_small": cnn_small((1, 28, 28), 10)}
    only = args.only.split(":") if args.only else None
    if only:  # the same weights: every model is built above under one seed, and trained under its own
        models = {only[0]: models[only[0]]}
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in models.items():
            started = time.perf_counter()
            net = train(net, x_train, y_train, args.epochs)
            accuracy = float((net(torch.as_tensor(x_test)).argmax(1).numpy() == y_test).mean())
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
            print(f"{name}: trained in {time.perf_counter() - started:.1f}s, test accuracy {accuracy:.3f}", flush=True)
            with torch.no_grad():
                correct = np.flatnonzero(net(torch.as_tensor(x_test[:50])).argmax(1).numpy() == y_test[:50])
            for index in correct[:args.images] if not only else [int(only[1])]:
                for epsilon in (0.02, 0.05) if not only else [float(only[2])]:
                    prop = Path(tmp) / f"{name}_{index}_{epsilon}.vnnlib"
                    prop.write_text(vnnlib.robustness_property(x_test[index], epsilon, 0.0, 1.0, int(y_test[index]), 10))
                    answer = prove_files(path, prop, args.timeout)
                    rows.append({"model": name, "image": int(index), "epsilon": epsilon, "status": answer.status,
                                 "phase": answer.phase, "seconds": round(answer.seconds, 3), "boxes": answer.boxes,
                                 "notes": answer.notes})
                    print(f"  image {index} ε={epsilon}: {answer.status} ({answer.phase}, {answer.seconds:.2f}s)",
                          flush=True)
            if only:
                return 0
            costs[name] = bound_cost(path, x_test[correct[0]], 0.02, int(y_test[correct[0]]))
            print(f"  CROWN bound: prover {costs[name]['prover_s']:.3f}s vs bare auto_LiRPA "
                  f"{costs[name]['bare_auto_lirpa_s']:.3f}s (x{costs[name]['ratio']:.2f})", flush=True)
    totals = {s: sum(r["status"] == s for r in rows) for s in ("unsat", "sat", "unknown", "timeout")}
    sat_times = [r["seconds"] for r in rows if r["status"] == "sat"]
    summary = {"settings": vars(args), "rows": rows, "totals": totals, "bound_cost": costs,
               "max_sat_seconds": max(sat_times) if sat_times else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"totals": totals, "max_sat_seconds": summary["max_sat_seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
