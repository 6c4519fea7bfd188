"""Stage `attack`: clean and robust accuracy on the test split, per attack and worst case,
an ε sweep, per-class figures and the gradient-masking sanity checks."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.attacks import FGSM, PGD, Attack
from pipeline.attacks.apgd import APGD, APGDTargeted
from pipeline.attacks.masking import run_checks
from pipeline.attacks.square import Square
from pipeline.attacks.suite import SuiteResult, robust_mask, run_suite, share
from pipeline.errors import UsageError
from pipeline.feasibility import apgd_targets, resolve_attacks
from pipeline.io import confine, sha256_file, write_json, write_lines, write_npz
from pipeline.policy import load_policy
from pipeline.results import (Accuracy, AttackRecord, AttackResult, AttackSweep, ClassRecord, NotApplicable,
                              ReferenceCoverage, RuntimeRecord, ThreatRecord, dump)
from pipeline.runtime import block_generator, release_freed_memory, run_shards, shard_ranges
from pipeline.stages.common import (check_model_outputs, load_data, load_model_for, seed_everything, shard_setup,
                                    start_runtime, streamed_rows)
from pipeline.stats import proportion
from pipeline.threat import LpBall, from_params
from pipeline.workspace import Workspace


def build_attacks(cfg, names: list[str], num_classes: int) -> list[Attack]:
    """The attacks `names` (from `resolve_attacks`), APGD-T's targets clamped to the task's classes."""
    p = cfg.pgd
    targets = apgd_targets(cfg, num_classes)
    factories = {
        "fgsm": lambda: FGSM(),
        "pgd": lambda: PGD(p.steps, p.step_size, p.restarts, schedule=p.schedule),
        "pgd_cw": lambda: PGD(p.steps, p.step_size, p.restarts, loss="cw", schedule=p.schedule),
        "apgd_ce": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "ce"),
        "apgd_dlr": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "dlr"),
        "apgd_t": lambda: APGDTargeted(cfg.apgd.steps, cfg.apgd.restarts, targets),
        "square": lambda: Square(cfg.square.queries, cfg.square.p_init, cfg.square.restarts),
    }
    return [factories[name]() for name in names]  # validated by the config


def sweep_grid(cfg, threat: LpBall, domain) -> list[float]:
    """The ε values of the sweep, 0 to max_factor·ε, capped at the domain's diameter."""
    limit = domain.diameter(threat.norm)
    return sorted({min(limit, float(f) * threat.epsilon)
                   for f in np.linspace(0.0, cfg.sweep.max_factor, cfg.sweep.points)})


GRADIENT_FREE = ("square",)  # the attacks that need forward passes only (pipeline.claims reads the same set)


def forward_only(model) -> str | None:
    """Why `model` answers forward passes only (pipeline.supplied.model.OnnxRuntimeForward: an op
    without a torch form, named), or None for a differentiable model."""
    return getattr(model, "not_differentiable", None)


def runnable_attacks(cfg, num_classes: int, model) -> tuple[list[str], list[str], dict[str, str]]:
    """`resolve_attacks`, less what a forward-only model cannot run: the gradient attacks (each with
    its reason) go, Square stays, and is added when not listed, so the file is still attacked."""
    names, notes = resolve_attacks(cfg, num_classes)
    reason = forward_only(model)
    if reason is None:
        return names, notes, {}
    skipped = {name: f"needs gradients, which the model does not have: {reason}" for name in names
               if name not in GRADIENT_FREE}
    kept = [name for name in names if name in GRADIENT_FREE] or ["square"]
    return kept, notes + [f"forward passes only ({reason}): ran {', '.join(kept)} on onnxruntime"], skipped


def sweep_attack(cfg, threat: LpBall, eps: float, model=None) -> Attack:
    """PGD with its step size scaled with ε (Square for a forward-only model)."""
    if model is not None and forward_only(model):
        return Square(cfg.square.queries, cfg.square.p_init, cfg.square.restarts)
    scale = eps / threat.epsilon if threat.epsilon > 0 else 0.0
    return PGD(cfg.pgd.steps, max(cfg.pgd.step_size * scale, 1e-12), cfg.pgd.restarts, schedule=cfg.pgd.schedule)


@dataclass(frozen=True)
class SamplesResult:
    """The per-sample part of the evaluation of samples [start, start + n) of the test split."""

    suite: SuiteResult
    sweep_robust: torch.Tensor  # bool (ε points, samples of this range inside the sweep's first `sweep_n`)


def attack_samples(model, params, x, y, domain, num_classes: int, seed: int, start: int = 0,
                   progress=None, data=None, adversarial: np.ndarray | None = None) -> SamplesResult:
    """Attack samples start..start+len(x) of the test split, one block of attack.batch_size at a
    time, each block drawing from :func:`block_generator` (seed, its first sample index): so the
    per-sample result does not depend on which process runs which block (see pipeline/runtime.py).
    `x` is a tensor or :class:`DeviceRows` (read block by block). `adversarial`: a writable array for
    these samples' adversarial examples, filled block by block (the result then holds none of them),
    else they are kept in the result."""
    cfg, threat = params.attack, from_params(params, data)
    names = runnable_attacks(cfg, num_classes, model)[0]
    attacks = build_attacks(cfg, names, num_classes)
    grid = sweep_grid(cfg, threat, domain)
    n = len(y)
    sweep_end = cfg.sweep.max_samples if cfg.sweep.max_samples is not None else start + n  # first samples
    # The per-sample results, allocated once and filled block by block: no block leaves small tensors
    # behind among its freed activations (they fragmented the heap: peak RSS grew with the blocks).
    clean, robust = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    broken = {attack.name: torch.zeros(n, dtype=torch.bool) for attack in attacks}
    adv_pred, broken_by, kept = torch.zeros(n, dtype=torch.int64), [], []
    sweep = torch.zeros((len(grid), max(0, min(n, sweep_end - start))), dtype=torch.bool)
    for offset in range(0, n, cfg.batch_size):
        xb, yb = x[offset:offset + cfg.batch_size], y[offset:offset + cfg.batch_size]
        rows = slice(offset, offset + len(yb))
        generator = block_generator(seed, start + offset, x.device)
        piece = run_suite(model, attacks, xb, yb, threat, domain, cfg.batch_size, generator, progress=progress,
                          sequential=cfg.mode == "sequential")
        clean[rows], robust[rows], adv_pred[rows] = piece.clean_correct.cpu(), piece.robust.cpu(), piece.adv_pred.cpu()
        for name, hit in piece.broken.items():
            broken[name][rows] = hit.cpu()
        broken_by.extend(piece.broken_by)
        if adversarial is not None:  # written out now: the stage never holds the split's adversarial examples
            adversarial[rows] = piece.x_adv.cpu().numpy()
        else:
            kept.append(piece.x_adv.cpu())
        inside = max(0, min(len(yb), sweep_end - start - offset))
        for k, eps in enumerate(grid if inside else []):
            sweep[k, offset:offset + inside] = robust_mask(model, sweep_attack(cfg, threat, eps, model), xb[:inside],
                                                           yb[:inside], threat.with_epsilon(eps), domain,
                                                           cfg.batch_size, generator).cpu()
        del piece, xb
    x_adv = torch.cat(kept) if kept else torch.zeros((0, *x.shape[1:]))
    return SamplesResult(SuiteResult(clean, broken, robust, broken_by, x_adv, adv_pred, cfg.mode == "sequential"),
                         sweep)


def merge_suites(pieces: list[SuiteResult]) -> SuiteResult:
    """Consecutive ranges' suite results as one, in sample order, on the CPU."""
    first = pieces[0]
    cat = lambda field: torch.cat([getattr(p, field).cpu() for p in pieces])  # noqa: E731
    return SuiteResult(cat("clean_correct"), {name: torch.cat([p.broken[name].cpu() for p in pieces])
                                              for name in first.broken},
                       cat("robust"), [b for p in pieces for b in p.broken_by], cat("x_adv"), cat("adv_pred"),
                       first.sequential)


def merge_samples(parts: list[SamplesResult]) -> SamplesResult:
    return SamplesResult(merge_suites([p.suite for p in parts]), torch.cat([p.sweep_robust for p in parts], dim=1))


# AutoAttack's "standard" suite (Croce & Hein 2020), the reference a reader compares against.
AUTOATTACK_STANDARD = ("apgd_ce", "apgd_t", "fab_t", "square")


def reference_coverage(names: list[str]) -> ReferenceCoverage:
    return ReferenceCoverage(reference="AutoAttack's standard suite (Croce & Hein 2020)", attacks=list(AUTOATTACK_STANDARD),
                             run=[a for a in AUTOATTACK_STANDARD if a in names],
                             not_run=[a for a in AUTOATTACK_STANDARD if a not in names])


def evaluate(model, params, x, y, domain, num_classes: int, generator, *, model_sha256: str, data_fingerprint: str,
             progress=None, data=None, samples: SamplesResult | None = None) -> tuple[AttackResult, SuiteResult]:
    """The attack evaluation of one model on (x, y): worst case over the configured attacks, the ε
    sweep and the masking checks. Pure: the stage and `robustgate compare` both call it. `data`: the
    prepared data, whose tabular statistics turn per-feature budgets into radii. The per-sample
    part comes from :func:`attack_samples` (seeded by `generator`'s seed and the sample index); the
    stage passes `samples` when shards computed it; the masking checks then run here on all samples."""
    cfg, threat = params.attack, from_params(params, data)
    if samples is None:
        samples = attack_samples(model, params, x, y, domain, num_classes, generator.initial_seed(), 0, progress,
                                 data=data)
    names, task_notes, skipped = runnable_attacks(cfg, num_classes, model)
    attacks = build_attacks(cfg, names, num_classes)
    result = samples.suite
    n = len(y)
    sweep_n = samples.sweep_robust.shape[1]
    sweep = []
    for eps, mask in zip(sweep_grid(cfg, threat, domain), samples.sweep_robust):
        stats = proportion(int(mask.sum()), sweep_n)
        sweep.append({"epsilon": eps, "robust_accuracy": stats["value"], "ci_low": stats["ci"][0],
                      "ci_high": stats["ci"][1], "n": stats["n"]})
    masking = []
    if cfg.masking.enabled and not skipped:  # the checks compare gradient attacks: none ran when skipped
        reference = next((a for a in attacks if isinstance(a, PGD)), PGD(cfg.pgd.steps, cfg.pgd.step_size, 1))
        suite_here = replace(result, clean_correct=result.clean_correct.to(x.device),
                             broken={k: v.to(x.device) for k, v in result.broken.items()},
                             robust=result.robust.to(x.device))
        masking = run_checks(model, suite_here, attacks, sweep, x, y, threat, domain, generator,
                             cfg.batch_size, cfg.masking.tolerance, domain.diameter(threat.norm),
                             cfg.masking.large_epsilon_max_accuracy, reference)
    names = [a.name for a in attacks]
    worst_case = f"worst case over {', '.join(names)} ({cfg.mode})"
    if skipped:  # the method says what the upper bound rests on
        worst_case = f"{', '.join(names)} on onnxruntime only (gradient attacks not applicable: {forward_only(model)})"
    per_attack = {}
    for attack in attacks:
        survived = int((result.clean_correct & ~result.broken[attack.name]).sum())
        per_attack[attack.name] = AttackRecord(
            settings=attack.settings(),
            broken=int(result.broken[attack.name].sum()),
            # in sequential mode an attack only sees what earlier ones left, so its own figure is not defined
            robust_accuracy=NotApplicable(status="not_applicable",
                                          reason="sequential mode: this attack saw only the samples earlier ones left")
            if result.sequential else Accuracy.of(survived, n, "upper_bound", attack.name),
        )
    for name, reason in skipped.items():  # not run: a gradient attack on a forward-only model
        per_attack[name] = AttackRecord(settings={}, broken=0,
                                        robust_accuracy=NotApplicable(status="not_applicable", reason=reason))
    per_class = {}
    for label in range(num_classes):
        members = y.cpu() == label
        if int(members.sum()):
            per_class[str(label)] = ClassRecord(
                n=int(members.sum()),
                clean_accuracy=share(result.clean_correct[members]),
                robust_accuracy=share(result.robust[members]))
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(confusion, (y.cpu().numpy(), result.adv_pred.numpy()), 1)
    ran = [c for c in masking if c.passed is not None]
    metrics = AttackResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha256, n=n,
        threat=ThreatRecord(**threat.record()), mode=cfg.mode,
        clean_accuracy=Accuracy.of(int(result.clean_correct.sum()), n, "point", "clean inputs"),
        robust_accuracy=Accuracy.of(int(result.robust.sum()), n, "upper_bound", worst_case),
        attacks=per_attack,
        broken_by={name: result.broken_by.count(name) for name in ["clean", *names]},
        per_class=per_class,
        confusion_under_attack=confusion.tolist(),
        sweep=AttackSweep(attack=f"square ({cfg.square.queries} queries; forward passes only)" if skipped
                          else "pgd (step size scaled with ε)", n=sweep_n, points=sweep),
        masking={c.name: c.record() for c in masking},
        masking_all_passed=float(bool(ran) and all(c.passed for c in ran) and len(ran) == len(masking)),
        masking_failed=[c.name for c in ran if not c.passed],
        reference_suite=reference_coverage(names),
        task_notes=task_notes,
        not_run=skipped,
    )
    return metrics, result


def refuse_clean_only(ws: Workspace, params) -> None:
    """ε = 0 measures clean accuracy only; it is refused unless the policy explicitly accepts that."""
    if params.threat.epsilon == 0 and not load_policy(confine(params.gate.policy, ws.root, "gate.policy")).allow_clean_only:
        raise UsageError(f"threat.epsilon = 0 is a clean-only evaluation, which policy {params.gate.policy} does not "
                         "accept (set allow_clean_only: true in the policy to evaluate clean accuracy only)")


def main(ws: Workspace) -> int:
    params = ws.params()
    refuse_clean_only(ws, params)
    runtime = start_runtime(params)
    data, domain, data_fingerprint = load_data(ws, params)
    cfg, threat = params.attack, from_params(params, data)
    model_sha = sha256_file(ws.checkpoint)
    model, _ = load_model_for(ws, params, data, data_fingerprint, runtime.device)
    generator = seed_everything(params.seed)
    x, y = streamed_rows(data, "test", cfg.max_samples, runtime.device)  # inputs read block by block
    check_model_outputs(model, x[:256], data.num_classes)
    ws.adversarial.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".x_adv.", suffix=".npy", dir=ws.adversarial.parent)
    os.close(fd)
    scratch = Path(scratch)
    try:
        adversarial = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=x.shape)
        samples = None
        if runtime.processes > 1:  # the per-sample part in shards, merged in sample order; the rest here
            ranges = shard_ranges(len(y), runtime.processes, cfg.batch_size)
            print(f"attack: {len(y)} samples in {len(ranges)} processes of {runtime.threads} thread(s)")
            adversarial.flush()
            samples = merge_samples(run_shards(_attack_shard, [(ws, data_fingerprint, a, b, scratch)
                                                               for a, b in ranges], runtime.threads))
        bar = tqdm(total=len(y) * len(resolve_attacks(cfg, data.num_classes)[0]), desc="attack", unit="img",
                   file=sys.stderr, mininterval=1.0, disable=samples is not None)
        if samples is None:
            samples = attack_samples(model, params, x, y, domain.to(runtime.device), data.num_classes,
                                     generator.initial_seed(), 0, data=data, adversarial=adversarial,
                                     progress=lambda name, count: (bar.set_postfix_str(name, refresh=False),
                                                                   bar.update(count), release_freed_memory()))
        bar.close()
        adversarial.flush()
        del adversarial
        metrics, result = evaluate(model, params, x, y, domain.to(runtime.device), data.num_classes, generator,
                                   model_sha256=model_sha, data_fingerprint=data_fingerprint, data=data,
                                   samples=samples)
        names = list(metrics.attacks)
        labels = y.cpu()
        write_npz(ws.adversarial, {  # streamed from the prepared split and the scratch file: never held whole
            "x": data.x["test"][:len(y)], "x_adv": np.load(scratch, mmap_mode="r"), "y": labels.numpy(),
            "adv_pred": result.adv_pred.numpy(), "clean_correct": result.clean_correct.cpu().numpy(),
            "robust": result.robust.cpu().numpy(), "broken_by": np.array(result.broken_by, dtype="U16"),
            "epsilon": np.float32(threat.epsilon), "norm": np.str_(threat.norm), "attacks": np.array(names),
            "model_sha256": np.str_(model_sha)})
    finally:
        scratch.unlink(missing_ok=True)
    write_lines(ws.attack_samples, (
        json.dumps({"index": i, "label": int(labels[i]), "clean_correct": bool(result.clean_correct[i]),
                    "adv_pred": int(result.adv_pred[i]), "robust": bool(result.robust[i]),
                    "broken_by": result.broken_by[i]})
        for i in range(metrics.n)))
    write_json(ws.root / "plots" / "attack_sweep.json", [p.model_dump() for p in metrics.sweep.points])
    write_json(ws.metrics("attack"), dump(metrics.model_copy(update={"runtime": RuntimeRecord(**runtime.record())})))
    robust = metrics.robust_accuracy
    print(f"attack: clean {metrics.clean_accuracy.value:.3f} robust {robust.value:.3f} "
          f"[{robust.ci[0]:.3f}, {robust.ci[1]:.3f}] n={metrics.n} ({', '.join(names)}, {threat.norm} "
          f"ε={threat.epsilon})")
    for name, check in metrics.masking.items():
        status = {"not_run": "not run", "pass": "pass", "fail": "FAIL"}[check.status]
        print(f"  masking check {name}: {status}: {check.detail}")
    return 0


def _attack_shard(ws: Workspace, data_fingerprint: str, start: int, stop: int, scratch: Path) -> SamplesResult:
    """One shard of :func:`main`, in its own process: test samples [start, stop), read block by block,
    their adversarial examples written into rows [start, stop) of the parent's scratch file."""
    s = shard_setup(ws, data_fingerprint, start, stop, streamed=True)
    adversarial = np.lib.format.open_memmap(scratch, mode="r+")
    try:
        return attack_samples(s.model, s.params, s.x, s.y, s.domain, s.data.num_classes, s.params.seed, start,
                              progress=lambda name, count: release_freed_memory(), data=s.data,
                              adversarial=adversarial[start:stop])
    finally:
        adversarial.flush()
