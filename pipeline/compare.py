"""`robustgate compare`: train and evaluate several methods on the prepared data, side by side.

Each method is trained with the workspace's params (only `train.method` changes), then
evaluated on the same test samples by the attack and certify stages' own code (the
configured attacks and mode with the gradient-masking checks, the configured certifiers
with their soundness cross-checks), so the table and the clean-vs-robust plot show the
accuracy-robustness trade-off a release decision weighs, measured as `dvc repro` measures it.

One row per method is written to `<out>/rows/<method>.json`, keyed by the params it was
trained under; the DVC study (`studies/dvc.yaml`) runs one method per `foreach` stage and
builds the table with `--collect`, which refuses rows trained under other params or data.
"""
from __future__ import annotations

import io
import time

import torch

from pipeline.config import with_method
from pipeline.errors import UsageError
from pipeline.io import confine, read_json, sha256_bytes, write_json, write_text
from pipeline.models import build_model, set_input_statistics
from pipeline.results import dump
from pipeline.stages.attack import evaluate as evaluate_attacks
from pipeline.stages.certify import certify_model
from pipeline.runtime import Runtime
from pipeline.stages.common import load_data, seed_everything, start_runtime, tensors
from pipeline.stages.train import fit_config
from pipeline.training.loop import TrainingDiverged, fit
from pipeline.training.methods import METHODS
from pipeline.workspace import Workspace


def study_key(params) -> str:
    """SHA-256 of every params section a row depends on except `train.method`, the one the study varies,
    `threat.rationale` (report prose; studies/dvc.yaml lists threat.norm and threat.epsilon only) and the
    runtime keys a row does not use (it runs in one process, its batches read in that process)."""
    return params.section_hash("seed", "data", "model", "threat", "train", "attack", "certify", "runtime",
                               exclude={"train": {"method"}, "threat": {"rationale"},
                                        "runtime": {"processes", "workers"}})


def weights_sha256(model) -> str:
    """SHA-256 of the weights as a checkpoint would store them, for evidence about an unsaved model."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return sha256_bytes(buffer.getvalue())


def evaluate_method(method: str, params, data, domain, samples: int, runtime: Runtime | None = None) -> dict:
    """Train with `method`, then evaluate with the attack and certify stages' own code (worst case over
    the configured attacks with the masking checks, every configured certifier with its soundness
    cross-checks) on the first `samples` test samples, on `runtime`'s device and precision as the train
    stage would (the CPU in float32 when None)."""
    device = runtime.device if runtime is not None else torch.device("cpu")
    generator = seed_everything(params.seed)
    model = build_model(params.model.name, list(data.x["train"].shape[1:]), data.num_classes,
                        params.model.factory_options())
    if data.tabular:
        set_input_statistics(model, data.mean, data.std)
    model, domain = model.to(device), domain.to(device)
    cfg = fit_config(with_method(params, method), data)
    hooks = {"autocast": runtime.autocast, "scaler": runtime.grad_scaler()} if runtime is not None else {}
    started = time.perf_counter()
    try:
        result = fit(model, *tensors(data, "train"), *tensors(data, "val"), domain, cfg, generator,
                     num_classes=data.num_classes, **hooks)
    except TrainingDiverged as error:  # one method failing must not cost the others' results
        failed = {"value": "diverged", "reason": str(error)}
        return {"method": method, "train_seconds": time.perf_counter() - started, "epochs_run": 0,
                "runtime": runtime.record() if runtime is not None else None,
                "clean": failed, "robust": failed, "verified_crown": failed, "verified_any": failed}
    seconds = time.perf_counter() - started
    model.load_state_dict(result.best_state)
    model.eval()
    x, y = tensors(data, "test", samples, device=device)
    digest, fingerprint = weights_sha256(model), "compare"
    attack, suite = evaluate_attacks(model, params, x, y, domain, data.num_classes, generator,
                                     model_sha256=digest, data_fingerprint=fingerprint, data=data)
    evidence = (suite.x_adv, suite.robust, len(y))
    certify, _ = certify_model(model, params, x, y, domain, data.num_classes, generator, evidence,
                               model_sha256=digest, data_fingerprint=fingerprint,
                               attack_sweep=dump(attack.sweep) if attack.sweep else None, report=lambda _: None,
                               data=data)

    def verified(name: str) -> dict:
        found = certify.verified_accuracy.get(name)
        return dump(found) if found is not None else {"value": "not_run", "reason": f"certify.methods has no {name}"}

    return {"method": method, "train_seconds": seconds, "epochs_run": len(result.history),
            "runtime": runtime.record() if runtime is not None else None,
            "best_epoch": result.best_epoch, "clean": dump(attack.clean_accuracy),
            "robust": dump(attack.robust_accuracy), "verified_crown": verified("crown"),
            "verified_any": verified("any"), "masking_all_passed": attack.masking_all_passed,
            "masking_failed": attack.masking_failed}


def compare(ws: Workspace, methods: str = "standard,pgd_at,trades", samples: int = 450, out: str = "reports/build",
            rows_only: bool = False, collect: bool = False) -> int:
    params = ws.params()
    target = confine(out, ws.root, "--out")
    key = study_key(params)
    runtime = None if collect else start_runtime(params, processes=1)  # threads applied, a missing device refused
    if collect:
        rows = collect_rows(target / "rows", key, load_data(ws, params)[2])
    else:
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise UsageError(f"--methods: unknown {unknown or 'empty list'}; allowed: {', '.join(METHODS)}")
        data, domain, fingerprint = load_data(ws, params)
        rows = []
        for method in chosen:
            row = {**evaluate_method(method, params, data, domain, samples, runtime), "study_key": key,
                   "dataset_fingerprint": fingerprint}
            write_json(target / "rows" / f"{method}.json", row)
            rows.append(row)
            shown = {k: (f"{row[k]['value']:.3f}" if isinstance(row[k].get("value"), float)
                         else row[k].get("value", row[k].get("status"))) for k in ("clean", "robust", "verified_crown")}
            print(f"compare: {method:<12} clean {shown['clean']} robust {shown['robust']} "
                  f"verified(CROWN) {shown['verified_crown']} ({row['train_seconds']:.0f}s)")
    if rows_only:
        return 0
    write_json(target / "comparison.json", {"epsilon": params.threat.epsilon, "norm": params.threat.norm,
                                            "attacks": ", ".join(params.attack.attacks), "rows": rows})
    write_text(target / "comparison.md", table(rows, params))
    write_plot(target / "comparison.png", rows, params)
    print(f"compare: wrote {target / 'comparison.md'} and comparison.png")
    return 0


def collect_rows(directory, key: str, data_fingerprint: str) -> list[dict]:
    """Every row in `directory`, in METHODS order; a row trained under other params or on other
    data is an error, because a table mixing them would compare what was never run side by side."""
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise UsageError(f"--collect: no rows in {directory}; run `robustgate compare --rows-only` first")
    rows = [read_json(f) for f in files]
    stale = [f.name for f, row in zip(files, rows)
             if row.get("study_key") != key or row.get("dataset_fingerprint") != data_fingerprint]
    if stale:
        raise UsageError(f"--collect: {', '.join(stale)} in {directory} were trained under other params "
                         "or on other data; re-run them or delete them")
    order = list(METHODS)
    return sorted(rows, key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))


def table(rows: list[dict], params) -> str:
    def cell(stat):
        if not isinstance(stat.get("value"), float):
            return str(stat.get("value", stat.get("status")))
        lo, hi = stat["ci"]
        return f"{100 * stat['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = [f"Methods compared at {params.threat.norm} ε = {params.threat.epsilon} (robust: worst case over "
             f"{', '.join(params.attack.attacks)} ({params.attack.mode}), an upper bound; verified: CROWN and "
             f"any of {', '.join(params.certify.methods)}, lower bounds; "
             f"95% Clopper-Pearson intervals; n = {rows[0]['clean'].get('n', '?')} test samples)", "",
             "| method | clean | robust | verified (CROWN) | verified (any) | masking checks | epochs | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        masking = {1.0: "pass", 0.0: "FAIL " + ", ".join(r.get("masking_failed", []))}.get(r.get("masking_all_passed"), "-")
        lines.append(f"| {r['method']} | {cell(r['clean'])} | {cell(r['robust'])} | {cell(r['verified_crown'])} | "
                     f"{cell(r.get('verified_any', {}))} | {masking} | {r['epochs_run']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_plot(path, rows: list[dict], params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        if not isinstance(r["clean"]["value"], float):
            continue  # diverged: nothing to place on the plot
        c, rb = r["clean"], r["robust"]
        ax.errorbar(c["value"], rb["value"],
                    xerr=[[c["value"] - c["ci"][0]], [c["ci"][1] - c["value"]]],
                    yerr=[[rb["value"] - rb["ci"][0]], [rb["ci"][1] - rb["value"]]], fmt="o", capsize=3)
        ax.annotate(r["method"], (c["value"], rb["value"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel="clean accuracy", ylabel=f"robust accuracy ({params.threat.norm}, ε={params.threat.epsilon})",
           title="Accuracy-robustness trade-off (95% intervals)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
