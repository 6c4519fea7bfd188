"""Stage `smooth`: randomized-smoothing certificates (Cohen et al. 2019) for the trained model.

The certificate is sound for any base classifier, but it is only strong for one
trained with Gaussian noise at the same σ (`train.method: gaussian`); the metrics
and the report say whether that holds.
"""
from __future__ import annotations

import json
import math
import sys
import time

from tqdm import tqdm

from pipeline.certify.smoothing import ABSTAIN, Smooth
from pipeline.io import write_json, write_text
from pipeline.stages.common import load_data, load_model_for, seed_everything, tensors
from pipeline.stats import proportion
from pipeline.workspace import SCHEMA_VERSION, Workspace


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.smoothing
    plot = ws.root / "plots" / "smooth.json"
    if not cfg.enabled:
        write_json(ws.metrics("smooth"), {"schema_version": SCHEMA_VERSION, "status": "not_run",
                                          "reason": "smoothing.enabled is false"})
        write_json(plot, [])
        write_text(ws.root / "artifacts" / "smooth" / "samples.jsonl", "")
        print("smooth: not run (smoothing.enabled is false)")
        return 0
    data, _, data_fingerprint = load_data(ws, params)
    model, meta = load_model_for(ws, params, data, data_fingerprint)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples)
    smooth = Smooth(model, data.num_classes, cfg.sigma, generator, cfg.batch_size)
    rows, started = [], time.perf_counter()
    for i in tqdm(range(len(y)), desc="smooth", unit="img", file=sys.stderr, mininterval=1.0):
        cert = smooth.certify(x[i], cfg.n0, cfg.n, cfg.alpha)
        rows.append({"index": i, "label": int(y[i]), "prediction": cert.prediction, "radius": cert.radius,
                     "p_a_lower": cert.p_a_lower, "correct": cert.prediction == int(y[i])})
    seconds = time.perf_counter() - started
    n, dims = len(rows), x[0].numel()
    curve = []
    for radius in sorted(cfg.radii):
        stats = proportion(sum(r["correct"] and r["radius"] >= radius for r in rows), n)
        curve.append({"radius": radius, "epsilon": radius, "robust_accuracy": stats["value"],
                      "ci_low": stats["ci"][0], "ci_high": stats["ci"][1], "linf_radius": radius / math.sqrt(dims),
                      "n": n})
    abstained = sum(r["prediction"] == ABSTAIN for r in rows)
    trained_for_it = meta.get("method") == "gaussian" and meta.get("noise_sigma") == cfg.sigma
    write_text(ws.root / "artifacts" / "smooth" / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(plot, curve)
    write_json(ws.metrics("smooth"), {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "sigma": cfg.sigma, "n0": cfg.n0, "n_samples_per_input": cfg.n, "alpha": cfg.alpha, "n": n,
        "certified_accuracy": {f"{c['radius']:g}": c["robust_accuracy"] for c in curve},
        "curve": curve,
        "abstention_rate": abstained / n,
        "mean_radius_correct": sum(r["radius"] for r in rows if r["correct"]) / n,
        "forward_passes": smooth.forward_passes,
        "seconds": seconds,
        "linf_note": f"an L2 radius r implies an L∞ radius r/√d with d = {dims}",
        "base_training_method": meta.get("method"),
        "base_trained_with_same_sigma": trained_for_it,
        "bound": "lower bound on the smoothed classifier's certified accuracy; each certificate fails with "
                 f"probability at most α = {cfg.alpha}",
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
    })
    at = {c["radius"]: c["robust_accuracy"] for c in curve}
    print(f"smooth: σ={cfg.sigma} n={n} certified accuracy " + ", ".join(f"r={r:g}: {a:.3f}" for r, a in at.items())
          + f"; abstained {abstained}; {smooth.forward_passes} forward passes in {seconds:.1f}s"
          + ("" if trained_for_it else f" (base model trained with {meta.get('method')}, not gaussian at σ={cfg.sigma})"))
    return 0
