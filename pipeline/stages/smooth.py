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

from scipy.stats import norm
from tqdm import tqdm

from pipeline.certify.smoothing import ABSTAIN, Smooth
from pipeline.io import sha256_file, write_json, write_text
from pipeline.results import Accuracy, SmoothPoint, SmoothResult, dump
from pipeline.runtime import block_generator, run_shards, shard_ranges
from pipeline.stages.common import load_data, load_model_for, seed_everything, shard_setup, start_runtime, tensors
from pipeline.workspace import Workspace


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest L2 radius CERTIFY can ever return with n samples at level α: even when every noisy
    copy votes for the class, the one-sided Clopper-Pearson bound is α^(1/n), so R ≤ σ·Φ⁻¹(α^(1/n))."""
    return sigma * float(norm.ppf(alpha ** (1.0 / n)))


def threat_coverage(r_max: float, dims: int, threat) -> str:
    """Whether a smoothing certificate can ever speak of the threat's ball at all."""
    needed = threat.epsilon * math.sqrt(dims) if threat.norm == "linf" else threat.epsilon
    ball = (f"the threat's L∞ ball of ε = {threat.epsilon:g} lies inside an L2 ball of radius ε·√d = {needed:.3g}"
            if threat.norm == "linf" else f"the threat's L2 ball has radius ε = {threat.epsilon:g}")
    limit = (f"with these n and α no certificate can exceed the L2 radius σ·Φ⁻¹(α^(1/n)) = {r_max:.3g}"
             f" (L∞ {r_max / math.sqrt(dims):.3g} on d = {dims} inputs)")
    if r_max >= needed:
        return f"{limit}; {ball}, so a certificate can cover the whole threat"
    return f"{limit}; {ball}, so smoothing cannot certify any sample against the whole threat"


def certify_samples(model, params, x, y, num_classes: int, seed: int, start: int = 0,
                    progress: bool = False) -> tuple[list[dict], int]:
    """CERTIFY for test samples start..start+len(x), each drawing its noise from its own generator
    (seed, sample index): the result of a sample does not depend on the process that certifies it.
    Returns the per-sample rows and the number of noisy forward passes."""
    cfg = params.smoothing
    smooth = Smooth(model, num_classes, cfg.sigma, block_generator(seed, start, x.device), cfg.batch_size)
    rows = []
    for i in tqdm(range(len(y)), desc="smooth", unit="img", file=sys.stderr, mininterval=1.0, disable=not progress):
        smooth.generator = block_generator(seed, start + i, x.device)
        cert = smooth.certify(x[i], cfg.n0, cfg.n, cfg.alpha)
        rows.append({"index": start + i, "label": int(y[i]), "prediction": cert.prediction, "radius": cert.radius,
                     "p_a_lower": cert.p_a_lower, "correct": cert.prediction == int(y[i])})
    return rows, smooth.forward_passes


def _smooth_shard(ws: Workspace, data_fingerprint: str, start: int, stop: int) -> tuple[list[dict], int]:
    """One shard of :func:`main`, in its own process: test samples [start, stop)."""
    s = shard_setup(ws, data_fingerprint, start, stop)
    return certify_samples(s.model, s.params, s.x, s.y, s.data.num_classes, s.params.seed, start)


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.smoothing
    plot = ws.root / "plots" / "smooth.json"
    if not cfg.enabled:
        write_json(ws.metrics("smooth"), dump(SmoothResult(status="not_run", reason="smoothing.enabled is false")))
        write_json(plot, [])
        write_text(ws.root / "artifacts" / "smooth" / "samples.jsonl", "")
        print("smooth: not run (smoothing.enabled is false)")
        return 0
    runtime = start_runtime(params)
    data, _, data_fingerprint = load_data(ws, params)
    model_sha = sha256_file(ws.checkpoint)
    model, meta = load_model_for(ws, params, data, data_fingerprint, runtime.device)
    seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples, runtime.device)
    started = time.perf_counter()
    ranges = shard_ranges(len(y), runtime.processes, 1)
    if len(ranges) > 1:
        print(f"smooth: {len(y)} samples in {len(ranges)} processes of {runtime.threads} thread(s)")
    parts = run_shards(_smooth_shard, [(ws, data_fingerprint, a, b) for a, b in ranges], runtime.threads) \
        if len(ranges) > 1 else [certify_samples(model, params, x, y, data.num_classes, params.seed, 0, progress=True)]
    rows = [row for part, _ in parts for row in part]
    forward_passes = sum(passes for _, passes in parts)
    seconds = time.perf_counter() - started
    n, dims = len(rows), x[0].numel()
    method = f"randomized smoothing σ={cfg.sigma:g}, n={cfg.n}, α={cfg.alpha:g}"
    curve = []
    for radius in sorted(cfg.radii):
        accuracy = Accuracy.of(sum(r["correct"] and r["radius"] >= radius for r in rows), n,
                               "probabilistic_certificate", method)
        curve.append(SmoothPoint(radius=radius, linf_radius=radius / math.sqrt(dims), certified_accuracy=accuracy))
    abstained = sum(r["prediction"] == ABSTAIN for r in rows)
    trained_for_it = meta.get("method") == "gaussian" and meta.get("noise_sigma") == cfg.sigma
    r_max = max_certifiable_radius(cfg.sigma, cfg.n, cfg.alpha)
    result = SmoothResult(
        status="ok", seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha,
        sigma=cfg.sigma, n0=cfg.n0, n_samples_per_input=cfg.n, alpha=cfg.alpha, n=n, input_dimension=dims,
        certified_accuracy={f"{c.radius:g}": c.certified_accuracy for c in curve},
        curve=curve,
        abstention_rate=abstained / n,
        mean_radius_correct=sum(r["radius"] for r in rows if r["correct"]) / n,
        max_certifiable_radius=r_max,
        threat_coverage=threat_coverage(r_max, dims, params.threat),
        forward_passes=forward_passes,
        seconds=seconds,
        base_training_method=meta.get("method"),
        base_trained_with_same_sigma=trained_for_it,
        runtime=runtime.record(),
    )
    write_text(ws.root / "artifacts" / "smooth" / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(plot, [{"radius": c.radius, "certified_accuracy": c.certified_accuracy.value,
                       "ci_low": c.certified_accuracy.ci[0], "ci_high": c.certified_accuracy.ci[1]} for c in curve])
    write_json(ws.metrics("smooth"), dump(result))
    print(f"smooth: σ={cfg.sigma} n={n} certified accuracy "
          + ", ".join(f"r={c.radius:g}: {c.certified_accuracy.value:.3f}" for c in curve)
          + f"; abstained {abstained}; {forward_passes} forward passes in {seconds:.1f}s; "
          + f"no radius above {r_max:.3g} is certifiable"
          + ("" if trained_for_it else f" (base model trained with {meta.get('method')}, not gaussian at σ={cfg.sigma})"))
    return 0
