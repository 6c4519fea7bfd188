"""`robustgate prove MODEL.onnx PROPERTY.vnnlib --timeout S [--result FILE]`.

Follows the VNN-COMP tool interface: the answer (`sat`, `unsat`, `unknown`,
`timeout`) is the first line of the result file, and a `sat` answer is followed
by the counterexample `((X_0 v) ... (Y_0 v) ...)`, confirmed with onnxruntime
on the supplied file. Bad input (a missing or unloadable file, several inputs,
an unsupported op, malformed VNNLIB, dimensions that do not match) is one line
and exit 2 with no result file; a torch form that disagrees with onnxruntime is
exit 1 (the proof would be about another model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import vnnlib
from pipeline.errors import ParityFailure, UsageError
from pipeline.io import write_text
from pipeline.prove import SAT, Answer, Options, Prover
from pipeline.supplied.onnx_torch import (OnnxRunner, Unsupported, check_against_onnxruntime, load_onnx,
                                          to_torch)

PARITY_ATOL = 1e-4


@dataclass
class Loaded:
    prover: Prover
    num_inputs: int
    num_outputs: int


def load_network(model_path: Path, options: Options | None = None) -> Loaded:
    """The ONNX file, its torch form and onnxruntime, checked to agree on random inputs."""
    model = load_onnx(model_path)
    try:
        module = to_torch(model)
    except Unsupported as error:
        raise UsageError(f"{model_path}: {error}") from None
    runner = OnnxRunner(model_path)
    num_inputs = int(np.prod(module.input_shape))
    num_outputs = int(np.prod(module.output_shape)) if module.output_shape else 1
    x = np.random.default_rng(0).uniform(-1, 1, size=(8, *module.input_shape)).astype(np.float32)
    gap = check_against_onnxruntime(module, runner, x)
    if gap > PARITY_ATOL:
        raise ParityFailure(f"{model_path}: the torch form differs from onnxruntime by {gap:.3g} > {PARITY_ATOL}; "
                            "no answer about this file would be sound")
    return Loaded(Prover(module, module.input_shape, runner, options), num_inputs, num_outputs)


def check_dimensions(prop: vnnlib.Property, loaded: Loaded, property_path: Path, model_path: Path) -> None:
    if prop.num_inputs != loaded.num_inputs:
        raise UsageError(f"{property_path}: declares {prop.num_inputs} inputs X_i; {model_path} takes {loaded.num_inputs}")
    if prop.num_outputs != loaded.num_outputs:
        raise UsageError(f"{property_path}: declares {prop.num_outputs} outputs Y_j; {model_path} gives {loaded.num_outputs}")


def check_parity_at(loaded: Loaded, prop: vnnlib.Property, model_path: Path) -> None:
    """The torch form must agree with onnxruntime inside the property's own input set too."""
    rng = np.random.default_rng(1)
    shape = loaded.prover.input_shape
    points = [rng.uniform(r.lower, r.upper, size=(4, r.lower.size)) for r in prop.regions[:8]]
    if points:
        x = np.concatenate(points).astype(np.float32).reshape(-1, *shape)
        gap = check_against_onnxruntime(loaded.prover.module, loaded.prover.judge, x)
        if gap > PARITY_ATOL:
            raise ParityFailure(f"{model_path}: inside the property's input set the torch form differs from "
                                f"onnxruntime by {gap:.3g} > {PARITY_ATOL}")


def result_text(answer: Answer) -> str:
    if answer.status == SAT:
        return "sat\n" + vnnlib.counterexample_text(answer.x, answer.y)
    return answer.status + "\n"


def prove_files(model_path: Path, property_path: Path, timeout: float, options: Options | None = None) -> Answer:
    if not timeout > 0:
        raise UsageError(f"--timeout = {timeout}: must be a positive number of seconds")
    prop = vnnlib.load(property_path)
    loaded = load_network(model_path, options)
    check_dimensions(prop, loaded, property_path, model_path)
    check_parity_at(loaded, prop, model_path)
    return loaded.prover.prove(prop, timeout)


def prove(model: Path, prop: Path, timeout: float, result: Path | None) -> int:
    answer = prove_files(model, prop, timeout)
    text = result_text(answer)
    if result is not None:
        write_text(result, text)
    detail = f"{answer.phase}, {answer.seconds:.2f}s" + (f", {answer.boxes} boxes" if answer.boxes else "")
    notes = "; ".join(answer.notes)
    print(f"{answer.status} ({detail}){': ' + notes if notes else ''}")
    return 0
