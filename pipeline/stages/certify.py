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

import numpy as np
import torch

from pipeline.certify.bounds import BoundComputer, NotBoundable, margins_of
from pipeline import results
from pipeline.errors import IntegrityMismatch, SoundnessViolation, UsageError
from pipeline.io import sha256_file, write_json, write_text
from pipeline.results import (Accuracy, CertifyMethodRecord, CertifyResult, CertifySweep, CombinedRecord,
                              NotApplicable, Soundness, ThreatRecord)
from pipeline.stages.common import load_data, load_model_for, seed_everything, tensors
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
        return torch.as_tensor(archive["x_adv"][:m]), torch.as_tensor(archive["robust"][:m]), m


def containment_violations(cert, model, x, y, x_adv, threat: LpBall, domain, generator, random_points: int,
                           tolerance: float) -> tuple[int, int]:
    """Points whose true margins fall outside the certified bounds (must be zero)."""
    lower, upper = cert.lower[: len(x)], cert.upper[: len(x)]
    probes = [x_adv] if x_adv is not None else []
    probes += [threat.random_start(x, domain, generator) for _ in range(random_points)]
    violations = checked = 0
    with torch.no_grad():
        for probe in probes:
            margin = margins_of(model(probe), y)
            bad = (margin < lower - tolerance) | (margin > upper + tolerance)
            violations += int(bad.any(dim=1).sum())
            checked += len(probe)
    return violations, checked


def certified_sweep(computer, x, y, sweep: list[dict], threat: LpBall, num_classes: int, batch_size: int,
                    tolerance: float, method: str) -> list[dict]:
    """Verified accuracy at the attack stage's ε grid, each checked against the attack's robust count."""
    rows = []
    n = len(y)
    for point in sweep:
        with torch.no_grad():
            verified = computer.certify(x, y, threat.with_epsilon(point["epsilon"]), method, num_classes, batch_size,
                                        tolerance).verified
        count = int(verified.sum())
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
                  data_fingerprint: str, attack_sweep=None, report=print, data=None) -> tuple[CertifyResult, dict]:
    """Verified accuracy of one model on (x, y) by every configured method, each cross-checked against
    the attack's evidence `(x_adv, attack_robust, m)`. Pure: the stage and `robustgate compare` call it.
    Returns the result and the per-sample rows."""
    cfg, threat = params.certify, from_params(params, data)
    x_adv, attack_robust, m = attack_evidence
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    n = len(y)
    verified_accuracy: dict = {}
    methods: dict[str, CertifyMethodRecord] = {}
    per_sample = {i: {"index": i, "label": int(y[i]), "clean_correct": bool(clean_correct[i])} for i in range(n)}
    complete: dict[str, torch.Tensor] = {}  # method -> verified mask, for methods that certified every sample
    extra: dict = {}
    status, reason = "ok", None
    try:
        computer = BoundComputer(model, tuple(x.shape[1:]), domain)
        for method in cfg.methods:
            report(f"certify: {method}: bounding {n} samples at {threat.norm} ε={threat.epsilon:g} ...")
            started = time.perf_counter()
            deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
            cert = computer.certify(x, y, threat, method, num_classes,
                                    cfg.batch_size, cfg.tolerance, deadline)
            done = len(cert.margin_lower)  # fewer than n when the time budget ran out
            verified = torch.zeros(n, dtype=torch.bool, device=y.device)
            verified[:done] = cert.verified & clean_correct[:done]
            conflicts = int((verified[:m] & ~attack_robust).sum())
            if conflicts:
                raise SoundnessViolation(
                    f"{conflicts} sample(s) certified by {method} at ε={threat.epsilon} "
                    "have an adversarial example from the attack stage; the certificate cannot be trusted"
                )
            k = min(m, done)
            violations, checked = containment_violations(
                cert, model, x[:k], y[:k], x_adv[:k], threat, domain, generator,
                cfg.random_points, cfg.tolerance)
            if violations:
                raise SoundnessViolation(f"{violations} of {checked} points have margins outside the {method} bounds")
            accuracy = Accuracy.of(int(verified[:done].sum()), done, "lower_bound", method)
            verified_accuracy[method] = accuracy
            methods[method] = CertifyMethodRecord(
                accuracy=accuracy, seconds=time.perf_counter() - started, requested=n, budget_exhausted=done < n,
                soundness=Soundness(attack_conflicts=conflicts, containment_violations=violations,
                                    points_checked=checked, samples_cross_checked=k, tolerance=cfg.tolerance))
            if done == n:
                complete[method] = verified
            for i in range(done):
                per_sample[i][f"{method}_margin_lower"] = float(cert.margin_lower[i])
                per_sample[i][f"{method}_verified"] = bool(verified[i])
            budget = f" (time budget: {done} of {n} certified)" if done < n else ""
            report(f"certify: {method} verified {accuracy.value:.3f} [{accuracy.ci[0]:.3f}, {accuracy.ci[1]:.3f}] "
                   f"n={done}{budget}; soundness: 0 conflicts, 0/{checked} containment violations")
        if len(complete) > 1:
            count, extra["combined"] = combined(complete, n)
            verified_accuracy["any"] = Accuracy.of(count, n, "lower_bound", "any of " + ", ".join(complete))
        if cfg.sweep and attack_sweep:
            fast = next((mth for mth in ("crown", "crown_ibp", "ibp") if mth in cfg.methods), cfg.methods[0])
            count = attack_sweep["n"]
            report(f"certify: {fast} at {len(attack_sweep['points'])} ε values of the sweep on {count} samples ...")
            rows = certified_sweep(computer, x[:count], y[:count], attack_sweep["points"], threat, num_classes,
                                   cfg.batch_size, cfg.tolerance, fast)
            extra["sweep"] = CertifySweep(method=fast, n=count, points=rows)
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
    data, domain, data_fingerprint = load_data(ws, params)
    model_sha = sha256_file(ws.checkpoint)
    model, _ = load_model_for(ws, params, data, data_fingerprint)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples)
    attack = results.load("attack", ws.metrics("attack"))
    if attack["model_sha256"] != model_sha:
        raise IntegrityMismatch(f"metrics/attack.json speaks of checkpoint {attack['model_sha256'][:12]}, "
                                f"{ws.checkpoint.name} is {model_sha[:12]}: re-run attack (dvc repro)")
    evidence = _attack_evidence(ws, len(x), from_params(params, data))
    result, per_sample = certify_model(model, params, x, y, domain, data.num_classes, generator, evidence,
                                       model_sha256=model_sha, data_fingerprint=data_fingerprint,
                                       attack_sweep=attack.get("sweep"), data=data)
    write_text(ws.certify_samples, "".join(json.dumps(row) + "\n" for row in per_sample.values()))
    write_json(ws.root / "plots" / "certify_sweep.json", [p.model_dump() for p in result.sweep.points]
               if result.sweep else [])
    write_json(ws.metrics("certify"), results.dump(result))
    return 0
