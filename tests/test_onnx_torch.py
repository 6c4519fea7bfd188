"""The torch form of ONNX files: equal to onnxruntime, and soundly boundable by auto_LiRPA.

Graphs are built node by node with onnx.helper as another framework would write them
(NHWC input + Transpose, normalisation as Sub/Div, Conv, BatchNormalization, MaxPool,
AveragePool, Flatten, Gemm, MatMul + Add, Softmax) and exported from torch (a CNN with
`(x - mean) / std` buffers and BatchNorm inside). The bound check compares CROWN bounds with
sampled outputs: it fails when weights are computed in the traced graph (auto_LiRPA 0.3 then
bounds a Gemm unsoundly: an IBP lower bound of 0.19 where sampling reaches -0.21), which is
why the converter folds all constant arithmetic at load. All new code: none of it existed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pipeline import vnnlib
from pipeline.prove import Prover
from pipeline.prove_cli import prove_files
from pipeline.supplied.onnx_torch import OnnxRunner, check_against_onnxruntime, to_torch


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def helper_cnn(path: Path, softmax: bool, seed: int = 0) -> Path:
    """An NHWC 8x8x3 CNN written node by node, normalisation baked in as Sub/Div."""
    rng = np.random.default_rng(seed)
    init = [
        _const("mean", rng.uniform(0.3, 0.6, (1, 3, 1, 1))), _const("std", rng.uniform(0.2, 0.4, (1, 3, 1, 1))),
        _const("w1", rng.normal(0, 0.4, (4, 3, 3, 3))), _const("b1", rng.normal(0, 0.1, 4)),
        _const("bn_s", rng.uniform(0.5, 1.5, 4)), _const("bn_b", rng.normal(0, 0.1, 4)),
        _const("bn_m", rng.normal(0, 0.1, 4)), _const("bn_v", rng.uniform(0.5, 2, 4)),
        _const("w2", rng.normal(0, 0.3, (6, 4, 3, 3))), _const("b2", rng.normal(0, 0.1, 6)),
        _const("w3", rng.normal(0, 0.3, (10, 24))), _const("b3", rng.normal(0, 0.1, 10)),
        _const("w4", rng.normal(0, 0.3, (10, 3))), _const("b4", rng.normal(0, 0.1, 3)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["t", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["n"]),
        helper.make_node("Conv", ["n", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["mm"]),
        helper.make_node("Add", ["mm", "b4"], ["logits" if not softmax else "z"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class NormalisedCNN(nn.Module):
    """The README's pattern: normalisation inside the model as buffers, with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]).reshape(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.25]).reshape(1, 1, 1, 1))
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


def torch_cnn(path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = NormalisedCNN()
    with torch.no_grad():
        bn = net.body[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return net, path


@pytest.mark.parametrize("softmax", [False, True])
def test_helper_built_graph_matches_onnxruntime(tmp_path, softmax):
    path = helper_cnn(tmp_path / "cnn.onnx", softmax)
    module = to_torch(onnx.load(str(path)))
    assert module.input_shape == (8, 8, 3)
    x = np.random.default_rng(1).uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    assert check_against_onnxruntime(module, OnnxRunner(path), x) < 1e-5


def test_torch_exported_normalised_bn_cnn_matches(tmp_path):
    net, path = torch_cnn(tmp_path / "t.onnx")
    module = to_torch(onnx.load(str(path)))
    x = np.random.default_rng(2).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    assert check_against_onnxruntime(module, OnnxRunner(path), x) < 1e-5
    with torch.no_grad():
        assert torch.allclose(module(torch.as_tensor(x)), net(torch.as_tensor(x)), atol=1e-5)


@pytest.mark.parametrize("build", ["helper", "torch"])
def test_crown_bounds_contain_sampled_outputs(tmp_path, build):
    """Sound bounds: the CROWN lower bound of every logit difference is below its sampled minimum."""
    if build == "helper":
        path = helper_cnn(tmp_path / "cnn.onnx", softmax=False)
    else:
        path = torch_cnn(tmp_path / "t.onnx")[1]
    module = to_torch(onnx.load(str(path)))
    prover = Prover(module, module.input_shape, OnnxRunner(path))
    n = int(np.prod(module.input_shape))
    centre = torch.as_tensor(np.random.default_rng(3).uniform(0.2, 0.8, n))
    lower, upper = (centre - 0.05)[None], (centre + 0.05)[None]
    a = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    conj = [(a, torch.zeros(3, dtype=torch.float64))]
    samples = lower + (upper - lower) * torch.rand(4000, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = torch.cat([samples, lower, upper])
    with torch.no_grad():
        out = torch.flatten(prover.module64(samples.reshape(-1, *module.input_shape)), 1)
    sampled_min = (out @ a.t()).min(dim=0).values
    for method in ("ibp", "crown"):
        bound = prover._lower_bounds(lower, upper, conj, method)[0]
        assert torch.all(bound <= sampled_min + 1e-9), (method, bound, sampled_min)


def test_prove_on_nhwc_helper_graph_both_answers(tmp_path):
    """Robustness of one input of the helper-built NHWC CNN: unsat at a tiny ε, sat at a huge one."""
    path = helper_cnn(tmp_path / "cnn.onnx", softmax=False)
    x0 = np.random.default_rng(4).uniform(0, 1, (8, 8, 3))
    label = int(np.argmax(OnnxRunner(path)(x0[None])[0]))
    answers = {}
    for epsilon in (1e-4, 1.0):
        prop = tmp_path / f"p{epsilon}.vnnlib"
        prop.write_text(vnnlib.robustness_property(x0, epsilon, 0.0, 1.0, label, 3))
        answers[epsilon] = prove_files(path, prop, timeout=60)
    assert answers[1e-4].status == "unsat"
    assert answers[1.0].status == "sat" and int(np.argmax(answers[1.0].y)) != label or \
        answers[1.0].y.max() == answers[1.0].y[label]
