"""Stage `export`: ONNX file, checked, with onnxruntime parity on clean and adversarial inputs."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from pipeline import __version__
from pipeline.errors import IntegrityMismatch, ParityFailure, UsageError
from pipeline.io import npz_member, sha256_file, write_json
from pipeline.onnx_export import EXPORTER, ExportError, export_onnx, latency, onnx_logits, parity, torch_logits
from pipeline.stages.common import load_data, load_model_for, seed_everything
from pipeline.results import ExportResult, dump
from pipeline.workspace import Workspace


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg, threat = params.export, params.threat
    data, _, data_fingerprint = load_data(ws, params)
    model_sha = sha256_file(ws.checkpoint)
    model, meta = load_model_for(ws, params, data, data_fingerprint)
    seed_everything(params.seed)
    if not ws.adversarial.is_file():
        raise UsageError(f"missing {ws.adversarial}: run `robustgate attack` first")
    x_adv = npz_member(ws.adversarial, "x_adv")  # mapped: the parity checks read it batch by batch
    with np.load(ws.adversarial, allow_pickle=False) as archive:
        y_adv = archive["y"]
        torch_robust = float(archive["robust"].mean())
        attacked = str(archive["model_sha256"]) if "model_sha256" in archive.files else "unknown"
    if attacked != model_sha:
        raise IntegrityMismatch(f"{ws.adversarial.name} was made against checkpoint {attacked[:12]}, "
                                f"{ws.checkpoint.name} is {model_sha[:12]}: re-run attack (dvc repro)")
    x_test = data.x["test"]
    if params.model.source == "onnx":  # torchscript and state_dict ship the ONNX export of their torch form
        return _ship_supplied(ws, params, model, meta, x_test, x_adv, y_adv, torch_robust, model_sha, data_fingerprint)
    metadata = {
        "robustgate.version": __version__,
        "robustgate.git_commit": ws.git_commit(),
        "robustgate.dataset_fingerprint": data_fingerprint,
        "robustgate.params_sha256": params.section_hash(  # what the model depends on, not report prose
            "seed", "data", "model", "train", "threat", exclude={"threat": {"rationale"}}),
        "robustgate.epsilon": str(threat.epsilon),
        "robustgate.norm": threat.norm,
        "robustgate.training_method": meta["method"],
        "robustgate.model_sha256": model_sha,
        "robustgate.exporter": EXPORTER,
    }
    ws.onnx.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=ws.onnx.parent)
    os.close(fd)
    tmp = ws.onnx.parent / os.path.basename(tmp_name)
    try:
        try:
            export_onnx(model, tuple(meta["input_shape"]), tmp, cfg.opset, metadata)
        except (ExportError, onnx.checker.ValidationError) as error:
            raise UsageError(f"ONNX export failed (opset {cfg.opset}): {error}") from None
        clean = parity(torch_logits(model, x_test), onnx_logits(tmp, x_test))
        adv_onnx = onnx_logits(tmp, x_adv)
        adv = parity(torch_logits(model, x_adv), adv_onnx)
        clean_onnx_ok = onnx_logits(tmp, x_test[: len(y_adv)]).argmax(1) == y_adv
        onnx_robust = float((clean_onnx_ok & (adv_onnx.argmax(1) == y_adv)).mean())
        worst = max(clean["max_abs_diff"], adv["max_abs_diff"])
        if worst > cfg.atol or min(clean["label_agreement"], adv["label_agreement"]) < cfg.min_label_agreement:
            raise ParityFailure(
                f"ONNX parity out of tolerance: max |Δlogit| {worst:.3g} (allowed {cfg.atol}), label agreement "
                f"clean {clean['label_agreement']:.4f} adversarial {adv['label_agreement']:.4f} "
                f"(required {cfg.min_label_agreement}); no model.onnx written"
            )
        os.replace(tmp, ws.onnx)
    finally:
        tmp.unlink(missing_ok=True)
    digest = sha256_file(ws.onnx)
    timing = latency(model, ws.onnx, x_test)
    write_json(ws.metrics("export"), dump(ExportResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha,
        onnx_sha256=digest,
        opset=cfg.opset,
        exporter=EXPORTER,
        max_abs_diff=clean["max_abs_diff"],
        label_agreement=clean["label_agreement"],
        n=clean["n"],
        adv_max_abs_diff=adv["max_abs_diff"],
        adv_label_agreement=adv["label_agreement"],
        adv_n=adv["n"],
        robust_accuracy_onnx=onnx_robust,
        robust_accuracy_torch=torch_robust,
        robust_accuracy_diff=abs(onnx_robust - torch_robust),
        metadata=metadata,
        latency=timing,
        latency_note="median wall-clock on this machine, onnxruntime CPU vs torch eager, same process",
    )))
    print(f"export: {ws.onnx.name} sha256 {digest[:12]} max|Δ| {worst:.2e} labels {clean['label_agreement']:.4f}/"
          f"{adv['label_agreement']:.4f} robust onnx {onnx_robust:.3f} vs torch {torch_robust:.3f}")
    return 0


def _ship_supplied(ws: Workspace, params, model, meta, x_test, x_adv, y_adv, torch_robust, model_sha,
                   data_fingerprint) -> int:
    """A supplied model ships as the supplied file, byte for byte (no re-export: that would be another
    file); what is checked is that onnxruntime on it agrees with the torch form every stage evaluated,
    on clean and on the attack stage's adversarial inputs."""
    from pipeline.io import atomic_write
    from pipeline.supplied.model import runner_logits
    from pipeline.supplied.onnx_torch import OnnxRunner

    cfg = params.export
    content = ws.checkpoint.read_bytes()
    runner = OnnxRunner(ws.checkpoint)
    clean_onnx, adv_onnx = runner_logits(model, runner, x_test), runner_logits(model, runner, x_adv)
    clean = parity(torch_logits(model, x_test), clean_onnx)
    adv = parity(torch_logits(model, x_adv), adv_onnx)
    onnx_robust = float(((clean_onnx[: len(y_adv)].argmax(1) == y_adv) & (adv_onnx.argmax(1) == y_adv)).mean())
    worst = max(clean["max_abs_diff"], adv["max_abs_diff"])
    if worst > cfg.atol or min(clean["label_agreement"], adv["label_agreement"]) < cfg.min_label_agreement:
        raise ParityFailure(f"the supplied file and its torch form disagree: max |Δ| {worst:.3g} (allowed {cfg.atol}), "
                            f"label agreement clean {clean['label_agreement']:.4f} adversarial "
                            f"{adv['label_agreement']:.4f}; no model.onnx written")
    ws.onnx.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(ws.onnx, lambda tmp: tmp.write_bytes(content))
    digest = sha256_file(ws.onnx)
    if digest != meta["sha256"]:
        raise IntegrityMismatch(f"{ws.onnx} sha256 {digest[:12]} is not the supplied file's {meta['sha256'][:12]}")
    opset = next((o.version for o in onnx.load(str(ws.onnx)).opset_import if o.domain in ("", "ai.onnx")), 0)
    write_json(ws.metrics("export"), dump(ExportResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha, onnx_sha256=digest,
        opset=opset, exporter="none: the supplied file, shipped unchanged" + (  # no torch form: nothing to compare
            f"; every stage ran on onnxruntime ({model.not_differentiable}), so the parity below is the file "
            "against itself" if getattr(model, "not_differentiable", None) else ""), max_abs_diff=clean["max_abs_diff"],
        label_agreement=clean["label_agreement"], n=clean["n"], adv_max_abs_diff=adv["max_abs_diff"],
        adv_label_agreement=adv["label_agreement"], adv_n=adv["n"], robust_accuracy_onnx=onnx_robust,
        robust_accuracy_torch=torch_robust, robust_accuracy_diff=abs(onnx_robust - torch_robust),
        metadata={"robustgate.supplied_path": str(meta.get("supplied_path")),
                  "robustgate.supplier": str(meta.get("supplier")), "robustgate.model_sha256": model_sha},
        latency={}, latency_note="not measured for a supplied file",
    )))
    print(f"export: shipping the supplied file unchanged, sha256 {digest[:12]}; onnxruntime vs torch form max|Δ| "
          f"{worst:.2e}, robust onnx {onnx_robust:.3f} vs torch {torch_robust:.3f}")
    return 0
