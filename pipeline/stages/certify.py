"""Stage `certify`: IBP and CROWN verified accuracy, with soundness cross-checks.

Two checks run every time, because a wrong certificate is the worst error a
report can carry: (1) no certified sample may have an adversarial example from
the attack stage; (2) the certified margin bounds must contain the margins of
the attack's adversarial points and of random points in the ε-ball. Either
failing stops the stage with exit code 1.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.certify.bounds import BoundComputer, NotBoundable, margins_of
from pipeline import results
from pipeline.errors import IntegrityMismatch, SoundnessViolation, UsageError
from pipeline.io import npz_member, sha256_file, write_json, write_text
from pipeline.results import (Accuracy, CertifyMethodRecord, CertifyResult, CertifySweep, CombinedRecord,
                              NotApplicable, Soundness, ThreatRecord)
from pipeline.runtime import block_generator, run_shards, shard_ranges
from pipeline.stages.common import load_data, load_model_for, seed_everything, shard_setup, start_runtime, tensors
from pipeline.stats import proportion
from pipeline.threat import LpBall, from_params
from pipeline.workspace import Workspace


def _attack_evidence(ws: Workspace, n: int, threat: LpBall):
    if not ws.adversarial.is_file():
        raise UsageError(f"missing {ws.adversarial}: run `robustgate attack` first (the soundness check needs it)")
    with np.load(ws.adversarial, allow_pickle=False) as archive:
        if float(archive["epsilon"]) != np.float32(threat.epsilon) or str(archive["norm"]) != threat.norm:
            raise UsageError(f"{ws.adversarial} is for {archive['norm']} ε={float(archive['epsilon'])}; re-run attack")
        m = min(n, len(archive["y"]))
        robust = torch.as_tensor(archive["robust"][:m])
    return torch.as_tensor(np.array(npz_member(ws.adversarial, "x_adv")[:m])), robust, m  # only m rows read


def containment_violations(cert, model, x, y, x_adv, threat: LpBall, domain, generator, random_points: int,
                           tolerance: float) -> torch.Tensor:
    """Per sample, how many of its probe points (the attack's point, random points in the ε-ball)
    have true margins outside the certified bounds (must be zero everywhere)."""
    lower, upper = cert.lower[: len(x)], cert.upper[: len(x)]
    probes = [x_adv] if x_adv is not None else []
    probes += [threat.random_start(x, domain, generator) for _ in range(random_points)]
    violations = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        for probe in probes:
            margin = margins_of(model(probe), y)
            bad = (margin < lower - tolerance) | (margin > upper + tolerance)
            violations += bad.any(dim=1).long().cpu()
    return violations


@dataclass(frozen=True)
class MethodSamples:
    """One method's per-sample part on consecutive samples: fewer than asked when the time budget ran out."""

    margin_lower: torch.Tensor  # float (done,)
    verified: torch.Tensor  # bool (done,): margin above tolerance (clean correctness is applied later)
    violations: torch.Tensor  # long (cross-checked,): containment violations per sample
    points: int  # probe points per cross-checked sample
    seconds: float


@dataclass(frozen=True)
class BoundsSamples:
    methods: dict[str, MethodSamples]
    sweep_verified: Optional[torch.Tensor]  # bool (ε points, samples inside the sweep) for the sweep's method


def sweep_method(cfg) -> str:
    """The fastest configured method, used for the ε sweep."""
    return next((mth for mth in ("crown", "crown_ibp", "ibp") if mth in cfg.methods), cfg.methods[0])


def bound_samples(model, params, x, y, domain, num_classes: int, seed: int, x_adv, start: int = 0,
                  attack_sweep=None, report=print, data=None) -> BoundsSamples:
    """Bound samples start..start+len(x) of the test split by every method, one block of
    certify.batch_size at a time (the batches one process would bound), and cross-check the first
    `len(x_adv)` against the attack's points and random points drawn from :func:`block_generator`
    (seed, block start): the per-sample result does not depend on the process that computes it.
    Raises NotBoundable when auto_LiRPA cannot bound the model."""
    cfg, threat = params.certify, from_params(params, data)
    computer = BoundComputer(model, tuple(x.shape[1:]), domain)
    methods = {}
    for method in cfg.methods:
        report(f"certify: {method}: bounding {len(y)} samples at {threat.norm} ε={threat.epsilon:g} ...")
        started = time.perf_counter()
        deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
        margins, verified, violations = [], [], []
        for offset in range(0, len(y), cfg.batch_size):
            if deadline is not None and margins and time.monotonic() > deadline:
                break  # the time budget certifies a prefix
            xb, yb = x[offset:offset + cfg.batch_size], y[offset:offset + cfg.batch_size]
            with torch.no_grad():
                cert = computer.certify(xb, yb, threat, method, num_classes, cfg.batch_size, cfg.tolerance)
            margins.append(cert.margin_lower.cpu())
            verified.append(cert.verified.cpu())
            k = max(0, min(len(yb), len(x_adv) - offset))
            if k:
                violations.append(containment_violations(
                    cert, model, xb[:k], yb[:k], x_adv[offset:offset + k], threat, domain,
                    block_generator(seed, start + offset, x.device), cfg.random_points, cfg.tolerance))
        methods[method] = MethodSamples(
            torch.cat(margins), torch.cat(verified),
            torch.cat(violations) if violations else torch.zeros(0, dtype=torch.long),
            1 + cfg.random_points, time.perf_counter() - started)
    sweep = None
    if cfg.sweep and attack_sweep:
        fast, count = sweep_method(cfg), max(0, min(len(y), attack_sweep["n"] - start))
        report(f"certify: {fast} at {len(attack_sweep['points'])} ε values of the sweep on {count} samples ...")
        rows = []
        for point in attack_sweep["points"]:
            with torch.no_grad():
                rows.append(computer.certify(x[:count], y[:count], threat.with_epsilon(point["epsilon"]), fast,
                                             num_classes, cfg.batch_size, cfg.tolerance).verified.cpu()
                            if count else torch.zeros(0, dtype=torch.bool))
        sweep = torch.stack(rows)
    return BoundsSamples(methods, sweep)


def merge_bounds(parts: list[BoundsSamples]) -> BoundsSamples:
    """Consecutive ranges' per-sample bounds as one, in sample order."""
    cat = lambda get: torch.cat([get(p) for p in parts])  # noqa: E731
    methods = {m: MethodSamples(cat(lambda p: p.methods[m].margin_lower), cat(lambda p: p.methods[m].verified),
                                cat(lambda p: p.methods[m].violations), parts[0].methods[m].points,
                                max(p.methods[m].seconds for p in parts))
               for m in parts[0].methods}
    sweep = None if parts[0].sweep_verified is None else torch.cat([p.sweep_verified for p in parts], dim=1)
    return BoundsSamples(methods, sweep)


def certified_sweep(verified: torch.Tensor, sweep: list[dict], method: str) -> list[dict]:
    """Verified accuracy at the attack stage's ε grid, each checked against the attack's robust count."""
    rows = []
    n = verified.shape[1]
    for point, mask in zip(sweep, verified):
        count = int(mask.sum())
        robust_count = round(point["robust_accuracy"] * point["n"])
        if count > robust_count:
            raise SoundnessViolation(
                f"{method} verifies {count} of {n} samples at ε={point['epsilon']:g} but the attack "
                f"left only {robust_count} robust; the certificate cannot be trusted"
            )
        stats = proportion(count, n)
        rows.append({"epsilon": point["epsilon"], "verified_accuracy": stats["value"], "ci_low": stats["ci"][0],
                     "ci_high": stats["ci"][1], "n": n, "attack_robust_accuracy": point["robust_accuracy"]})
    return rows


def combined(verified: dict[str, torch.Tensor], n: int) -> tuple[int, CombinedRecord]:
    """Samples verified by at least one method. Each method is sound on its own, so their union is
    a sound lower bound too, and the strongest claim the evidence supports (IBP can be tighter
    than CROWN on IBP-trained networks, and the other way round on adversarially trained ones)."""
    union = torch.zeros(n, dtype=torch.bool, device=next(iter(verified.values())).device)
    for mask in verified.values():
        union |= mask
    only = {m: int((mask & ~torch.stack([v for k, v in verified.items() if k != m]).any(0)).sum())
            for m, mask in verified.items()}
    return int(union.sum()), CombinedRecord(methods=list(verified), verified_by_this_method_only=only)


def certify_model(model, params, x, y, domain, num_classes: int, generator, attack_evidence, *, model_sha256: str,
                  data_fingerprint: str, attack_sweep=None, report=print, data=None,
                  samples: Optional[Callable[[], BoundsSamples]] = None) -> tuple[CertifyResult, dict]:
    """Verified accuracy of one model on (x, y) by every configured method, each cross-checked against
    the attack's evidence `(x_adv, attack_robust, m)`. Pure: the stage and `robustgate compare` call it.
    The per-sample bounds come from :func:`bound_samples` seeded by `generator`'s seed (or from
    `samples()`, when the stage computed them in shards). Returns the result and the per-sample rows."""
    cfg, threat = params.certify, from_params(params, data)
    x_adv, attack_robust, m = attack_evidence
    n = len(y)
    verified_accuracy: dict = {}
    methods: dict[str, CertifyMethodRecord] = {}
    complete: dict[str, torch.Tensor] = {}  # method -> verified mask, for methods that certified every sample
    extra: dict = {}
    status, reason = "ok", None
    attack_robust = attack_robust.cpu()
    with torch.no_grad():
        clean_correct = (model(x).argmax(1) == y).cpu()
    per_sample = {i: {"index": i, "label": int(y[i]), "clean_correct": bool(clean_correct[i])} for i in range(n)}
    try:
        if getattr(model, "not_boundable", None):  # a supplied model without a boundable form (pipeline.supplied)
            raise NotBoundable(model.not_boundable)
        bounds = samples() if samples is not None else bound_samples(
            model, params, x, y, domain, num_classes, generator.initial_seed(), x_adv[:m].to(x.device), 0,
            attack_sweep, report, data)
        for method, part in bounds.methods.items():
            done = len(part.margin_lower)  # fewer than n when the time budget ran out
            verified = torch.zeros(n, dtype=torch.bool)
            verified[:done] = part.verified & clean_correct[:done]
            conflicts = int((verified[:m] & ~attack_robust).sum())
            if conflicts:
                raise SoundnessViolation(
                    f"{conflicts} sample(s) certified by {method} at ε={threat.epsilon} "
                    "have an adversarial example from the attack stage; the certificate cannot be trusted"
                )
            k = min(m, done)
            violations, checked = int(part.violations[:k].sum()), k * part.points
            if violations:
                raise SoundnessViolation(f"{violations} of {checked} points have margins outside the {method} bounds")
            accuracy = Accuracy.of(int(verified[:done].sum()), done, "lower_bound", method)
            verified_accuracy[method] = accuracy
            methods[method] = CertifyMethodRecord(
                accuracy=accuracy, seconds=part.seconds, requested=n, budget_exhausted=done < n,
                soundness=Soundness(attack_conflicts=conflicts, containment_violations=violations,
                                    points_checked=checked, samples_cross_checked=k, tolerance=cfg.tolerance))
            if done == n:
                complete[method] = verified
            for i in range(done):
                per_sample[i][f"{method}_margin_lower"] = float(part.margin_lower[i])
                per_sample[i][f"{method}_verified"] = bool(verified[i])
            budget = f" (time budget: {done} of {n} certified)" if done < n else ""
            report(f"certify: {method} verified {accuracy.value:.3f} [{accuracy.ci[0]:.3f}, {accuracy.ci[1]:.3f}] "
                   f"n={done}{budget}; soundness: 0 conflicts, 0/{checked} containment violations")
        if len(complete) > 1:
            count, extra["combined"] = combined(complete, n)
            verified_accuracy["any"] = Accuracy.of(count, n, "lower_bound", "any of " + ", ".join(complete))
        if bounds.sweep_verified is not None:
            fast = sweep_method(cfg)
            rows = certified_sweep(bounds.sweep_verified, attack_sweep["points"], fast)
            extra["sweep"] = CertifySweep(method=fast, n=bounds.sweep_verified.shape[1], points=rows)
    except NotBoundable as error:
        status, reason = "not_applicable", f"auto_LiRPA cannot bound this model: {error}"
        verified_accuracy = {method: NotApplicable(status="not_applicable", reason=reason) for method in cfg.methods}
        methods, extra = {}, {}
        report(f"certify: not applicable: {error}")
    result = CertifyResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha256, status=status,
        reason=reason, n=n, threat=ThreatRecord(**threat.record()),
        requested_methods=list(cfg.methods), verified_accuracy=verified_accuracy, methods=methods,
        tolerance=cfg.tolerance, **extra)
    return result, per_sample


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.certify
    runtime = start_runtime(params)
    data, domain, data_fingerprint = load_data(ws, params)
    model_sha = sha256_file(ws.checkpoint)
    model, _ = load_model_for(ws, params, data, data_fingerprint, runtime.device)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples, runtime.device)
    attack = results.load("attack", ws.metrics("attack"))
    if attack["model_sha256"] != model_sha:
        raise IntegrityMismatch(f"metrics/attack.json speaks of checkpoint {attack['model_sha256'][:12]}, "
                                f"{ws.checkpoint.name} is {model_sha[:12]}: re-run attack (dvc repro)")
    evidence = _attack_evidence(ws, len(x), from_params(params, data))
    samples = None
    if runtime.processes > 1 and cfg.time_budget_s is not None:
        print("certify: one process: a time budget certifies a prefix, which shards cannot share")
    elif runtime.processes > 1:
        ranges = shard_ranges(len(y), runtime.processes, cfg.batch_size)
        print(f"certify: {len(y)} samples in {len(ranges)} processes of {runtime.threads} thread(s)")
        shards = [(ws, data_fingerprint, a, b, attack.get("sweep")) for a, b in ranges]
        samples = lambda: merge_bounds(run_shards(_certify_shard, shards, runtime.threads))  # noqa: E731
    result, per_sample = certify_model(model, params, x, y, domain.to(runtime.device), data.num_classes, generator,
                                       evidence, model_sha256=model_sha, data_fingerprint=data_fingerprint,
                                       attack_sweep=attack.get("sweep"), data=data, samples=samples)
    write_text(ws.certify_samples, "".join(json.dumps(row) + "\n" for row in per_sample.values()))
    write_json(ws.root / "plots" / "certify_sweep.json", [p.model_dump() for p in result.sweep.points]
               if result.sweep else [])
    recorded = result.model_copy(update={"runtime": results.RuntimeRecord(**runtime.record())})
    write_json(ws.metrics("certify"), results.dump(recorded))
    return 0


def _certify_shard(ws: Workspace, data_fingerprint: str, start: int, stop: int, attack_sweep) -> BoundsSamples:
    """One shard of :func:`main`, in its own process: test samples [start, stop)."""
    s = shard_setup(ws, data_fingerprint, start, stop)
    x_adv, _, m = _attack_evidence(ws, stop, from_params(s.params, s.data))
    return bound_samples(s.model, s.params, s.x, s.y, s.domain, s.data.num_classes, s.params.seed,
                         x_adv[start:m].to(s.runtime.device), start, attack_sweep, report=lambda line: None,
                         data=s.data)
