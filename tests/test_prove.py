"""`robustgate prove`: answers checked against properties whose answer is known by construction.

The reference is an exact MILP (scipy.optimize.milp, HiGHS) of the minimum of a linear
function of the outputs of a small ReLU network over a box. A threshold below that minimum
makes the property unsat, above it sat: the verifier must say so in both directions, and a
`sat` must come with a point that onnxruntime confirms. All of this is new code: before it,
`robustgate prove` did not exist (argparse exit 2 on the unknown command).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy.optimize import LinearConstraint, milp
from torch import nn

from pipeline import vnnlib
from pipeline.errors import UsageError
from pipeline.prove import Options
from pipeline.prove_cli import prove_files

ROOT = Path(__file__).resolve().parents[1]


def _mlp(seed: int, sizes: list[int]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _export(net: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.onnx.export(net, (torch.zeros(1, *shape),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return path


def exact_minimum(net: nn.Sequential, c: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """min over the box of c . net(x), exactly, by a big-M MILP on the ReLU activation patterns."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears]
    n_vars, bounds_lo, bounds_hi, integrality = len(lower), list(lower), list(upper), [0] * len(lower)
    rows, row_lo, row_hi = [], [], []
    previous, lo, hi = list(range(len(lower))), lower.astype(float), upper.astype(float)

    def add_var(a, b, integer=0):
        nonlocal n_vars
        bounds_lo.append(a)
        bounds_hi.append(b)
        integrality.append(integer)
        n_vars += 1
        return n_vars - 1

    pending = []
    for w, b in weights[:-1]:
        pre_lo = np.clip(w, 0, None) @ lo + np.clip(w, None, 0) @ hi + b
        pre_hi = np.clip(w, 0, None) @ hi + np.clip(w, None, 0) @ lo + b
        current = []
        for j in range(len(b)):
            z = add_var(pre_lo[j], pre_hi[j])
            pending.append(({z: -1.0, **{p: w[j, i] for i, p in enumerate(previous)}}, -b[j], -b[j]))
            a = add_var(0.0, max(pre_hi[j], 0.0))
            d = add_var(0, 1, 1)
            pending.append(({a: 1.0, z: -1.0}, 0.0, np.inf))  # a >= z
            pending.append(({a: 1.0, z: -1.0, d: -pre_lo[j]}, -np.inf, -pre_lo[j]))  # a <= z - l (1 - d)
            pending.append(({a: 1.0, d: -max(pre_hi[j], 0.0)}, -np.inf, 0.0))  # a <= u d
            current.append(a)
        previous, lo, hi = current, np.maximum(pre_lo, 0), np.maximum(pre_hi, 0)
    w, b = weights[-1]
    objective = np.zeros(n_vars)
    for i, p in enumerate(previous):
        objective[p] = c @ w[:, i]
    for coeffs, a, bnd in pending:
        row = np.zeros(n_vars)
        for k, v in coeffs.items():
            row[k] = v
        rows.append(row)
        row_lo.append(a)
        row_hi.append(bnd)
    from scipy.optimize import Bounds

    result = milp(objective, constraints=LinearConstraint(np.array(rows), row_lo, row_hi),
                  integrality=np.array(integrality), bounds=Bounds(bounds_lo, bounds_hi),
                  options={"mip_rel_gap": 0.0})
    assert result.status == 0, result.message
    return float(result.fun + c @ b)


def _linear_property(n_in: int, n_out: int, lower, upper, c_pos: int, c_neg: int, threshold: float) -> str:
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    text += "".join(f"(assert (>= X_{i} {float(lower[i])!r}))\n(assert (<= X_{i} {float(upper[i])!r}))\n" for i in range(n_in))
    return text + f"(assert (<= (- Y_{c_pos} Y_{c_neg}) {float(threshold)!r}))\n"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_answers_both_directions(tmp_path, seed):
    """Y_0 - Y_1 <= m* - δ is unsat and <= m* + δ is sat, with m* the MILP's exact minimum; the
    unsat cases near m* need branch and bound (the bounds alone are loose there)."""
    net = _mlp(seed, [3, 12, 12, 2])
    model = _export(net, (3,), tmp_path / "m.onnx")
    lower, upper = -np.ones(3), np.ones(3)
    m_star = exact_minimum(net, np.array([1.0, -1.0]), lower, upper)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    phases = set()
    for delta, expected in [(-0.05, "unsat"), (-0.005, "unsat"), (0.005, "sat"), (0.05, "sat")]:
        prop = tmp_path / "p.vnnlib"
        prop.write_text(_linear_property(3, 2, lower, upper, 0, 1, m_star + delta))
        answer = prove_files(model, prop, timeout=60)
        assert answer.status == expected, (delta, m_star, answer)
        phases.add(answer.phase)
        if expected == "sat":
            assert np.all(answer.x >= lower) and np.all(answer.x <= upper)
            y = session.run(None, {"x": answer.x.reshape(1, 3).astype(np.float32)})[0][0]
            assert y[0] - y[1] <= m_star + delta
    assert "bab" in phases or "alpha_crown" in phases or "crown" in phases


def test_disjunction_of_conjunctions(tmp_path):
    """Robustness in VNN-COMP form (an `or` of `and`s): unsat at a tiny ε, sat at the whole box,
    where the counterexample is classified otherwise by onnxruntime."""
    net = _mlp(3, [4, 10, 3])
    model = _export(net, (4,), tmp_path / "m.onnx")
    x0 = np.array([0.3, -0.2, 0.1, 0.5])
    label = int(net(torch.as_tensor(x0, dtype=torch.float32)[None]).argmax())
    for epsilon, expected in [(1e-3, "unsat"), (5.0, "sat")]:
        prop = tmp_path / "r.vnnlib"
        prop.write_text(vnnlib.robustness_property(x0, epsilon, -10 * np.ones(4), 10 * np.ones(4), label, 3))
        answer = prove_files(model, prop, timeout=60)
        assert answer.status == expected
        if expected == "sat":
            assert int(np.argmax(answer.y)) != label or np.max(answer.y) == answer.y[label]


def test_timeout_is_not_unsat(tmp_path):
    """A budget too small to settle a hard property answers `timeout` (never a guess)."""
    net = _mlp(0, [3, 12, 12, 2])
    model = _export(net, (3,), tmp_path / "m.onnx")
    m_star = exact_minimum(net, np.array([1.0, -1.0]), -np.ones(3), np.ones(3))
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_linear_property(3, 2, -np.ones(3), np.ones(3), 0, 1, m_star - 1e-4))
    answer = prove_files(model, prop, timeout=0.05)
    assert answer.status in ("timeout", "unsat")  # unsat only if decided before the deadline
    assert answer.status == "timeout" or answer.seconds < 0.05 + 1.0


# --- the VNNLIB parser ------------------------------------------------------------------------------

def test_parser_dnf_and_boxes():
    text = """; comment
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 -1) (<= X_1 0.5))
            (and (>= X_0 2) (<= X_0 3) (>= X_1 -1) (<= X_1 0.5))))
(assert (or (and (>= Y_1 Y_0)) (and (<= (* 2 Y_2) (+ Y_0 1.5)) (>= Y_2 -3))))
"""
    prop = vnnlib.parse(text)
    assert (prop.num_inputs, prop.num_outputs, len(prop.regions)) == (2, 3, 2)
    region = prop.regions[1]
    assert region.lower.tolist() == [2.0, -1.0] and region.upper.tolist() == [3.0, 0.5]
    (a1, b1), (a2, b2) = region.conjuncts
    assert a1.tolist() == [[1.0, -1.0, 0.0]] and b1.tolist() == [0.0]  # Y_0 - Y_1 <= 0
    assert a2.tolist() == [[-1.0, 0.0, 2.0], [0.0, 0.0, -1.0]] and b2.tolist() == [1.5, 3.0]


@pytest.mark.parametrize("text, message", [
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n", "expected ')', got end of file"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
     "(assert (foo Y_0 1))\n", ":5: expected 'and', 'or', '<=' or '>=', got 'foo'"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (<= Y_0 Y_1))\n",
     ":4: Y_1 is used before its declare-const"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (<= Y_0 0))\n",
     "X_0 has no lower and upper bound"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
     "(assert (<= (* Y_0 Y_0) 0))\n", ":5: a product of two variables"),
])
def test_parser_names_line_and_expectation(text, message):
    with pytest.raises(UsageError, match=None) as info:
        vnnlib.parse(text, "p.vnnlib")
    assert message in str(info.value)


# --- the command line ------------------------------------------------------------------------------

def _cli(*args: str, cwd: Path):
    return subprocess.run([sys.executable, "-m", "pipeline", "prove", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_cli_writes_vnncomp_result_and_counterexample(tmp_path):
    net = _mlp(4, [2, 8, 2])
    model = _export(net, (2,), tmp_path / "m.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_linear_property(2, 2, [-1, -1], [1, 1], 0, 1, 1e6))  # always met: sat
    done = _cli(str(model), str(prop), "--timeout", "30", "--result", str(tmp_path / "out.txt"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[0] == "sat" and lines[1].startswith("((X_0 ") and lines[-1].endswith(")")
    values = {k: float(v) for k, v in (entry.strip(" ()").split() for entry in lines[1:])}
    assert set(values) == {"X_0", "X_1", "Y_0", "Y_1"}


def _tanh_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _two_input_model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("malformed", "p.vnnlib:3: expected"),
    ("dimension", "declares 3 inputs X_i; "),
    ("missing", "no such model file"),
    ("garbage", "not a loadable ONNX model"),
    ("two_inputs", "2 inputs and 1 outputs"),
    ("unsupported", "ONNX op Tanh"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, case, message):
    model = _export(_mlp(0, [2, 4, 2]), (2,), tmp_path / "m.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_linear_property(2, 2, [-1, -1], [1, 1], 0, 1, 0.0))
    if case == "malformed":
        prop.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1) (\n")
    elif case == "dimension":
        prop.write_text(_linear_property(3, 2, [-1] * 3, [1] * 3, 0, 1, 0.0))
    elif case == "missing":
        model = tmp_path / "absent.onnx"
    elif case == "garbage":
        model.write_bytes(b"not a protobuf at all")
    elif case == "two_inputs":
        model = _two_input_model(tmp_path / "two.onnx")
    elif case == "unsupported":
        model = _tanh_model(tmp_path / "tanh.onnx")
    result = tmp_path / "out.txt"
    done = _cli(str(model), str(prop), "--timeout", "10", "--result", str(result), cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not result.exists()


def test_options_default_is_sound_tolerance():
    assert Options().tolerance > 0


# --- ReLU splitting (inputs too many to split) ---------------------------------------------------------

def _wide_net(seed: int) -> nn.Sequential:
    return _mlp(seed, [24, 16, 16, 2])


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_splitting_decides_what_input_splitting_cannot(tmp_path, seed):
    """24 inputs: input splitting with α-CROWN does not settle Y_0 - Y_1 <= m* - δ (m* the MILP's exact
    minimum) within 5 s; ReLU splitting proves it unsat, and m* + δ is sat with a point onnxruntime
    confirms. Before ReLU splitting the prover answered `unknown` for inputs beyond max_split_dims."""
    net = _wide_net(seed)
    model = _export(net, (24,), tmp_path / "m.onnx")
    lower, upper = -np.ones(24), np.ones(24)
    m_star = exact_minimum(net, np.array([1.0, -1.0]), lower, upper)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star - 0.02))
    by_inputs = prove_files(model, prop, timeout=5, options=Options(max_split_dims=64))
    assert by_inputs.status in ("timeout", "unknown"), by_inputs
    by_relus = prove_files(model, prop, timeout=60, options=Options(max_split_dims=0))
    assert (by_relus.status, by_relus.phase) == ("unsat", "relu_bab"), by_relus
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star + 0.02))
    found = prove_files(model, prop, timeout=60, options=Options(max_split_dims=0))
    assert found.status == "sat", found
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": found.x.reshape(1, 24).astype(np.float32)})[0][0]
    assert np.all(found.x >= lower) and np.all(found.x <= upper) and y[0] - y[1] <= m_star + 0.02


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_relu_splitting_complete_both_sides_of_the_exact_minimum(tmp_path, seed):
    """1e-3 above m* the property is sat, 1e-3 below it unsat: ReLU splitting alone (the attack phase
    cut to one start and no steps) decides both, sub-domains on which the net is affine through the LP,
    and every sat point is confirmed by onnxruntime. The old prover answered unknown to both."""
    net = _wide_net(seed)
    model = _export(net, (24,), tmp_path / "m.onnx")
    lower, upper = -np.ones(24), np.ones(24)
    m_star = exact_minimum(net, np.array([1.0, -1.0]), lower, upper)
    prop = tmp_path / "p.vnnlib"
    weak = Options(max_split_dims=0, pgd_steps=0, pgd_restarts=1)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star + 1e-3))
    above = prove_files(model, prop, timeout=30, options=weak)
    assert above.status == "sat", above
    y = session.run(None, {"x": above.x.reshape(1, 24).astype(np.float32)})[0][0]
    assert y[0] - y[1] <= m_star + 1e-3
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star - 1e-3))
    below = prove_files(model, prop, timeout=30, options=weak)
    assert (below.status, below.phase) == ("unsat", "relu_bab"), below


def test_beta_crown_bound_holds_on_its_sub_domain():
    """The β-CROWN bound under random split constraints is below c.f(x) at every sampled x of the
    sub-domain (box points meeting the splits), for optimised α and β: a wrong sign of a split's
    Lagrangian term would push it above."""
    from pipeline.certify.beta_crown import Chain, lower_bound

    net = _mlp(5, [6, 12, 12, 3]).double()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    chain = Chain([(m.weight.detach(), m.bias.detach()) for m in linears])
    x_lo, x_hi = -torch.ones(1, 6, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64)
    points = x_lo + (x_hi - x_lo) * torch.rand(200_000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pre1 = points @ linears[0].weight.detach().t() + linears[0].bias.detach()
    pre2 = torch.relu(pre1) @ linears[1].weight.detach().t() + linears[1].bias.detach()
    values = net(points) @ torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64).t()
    # interval bounds of both layers over the box: valid on every sub-domain
    lo1, hi1 = pre1.min(0).values - 1.0, pre1.max(0).values + 1.0
    lo2, hi2 = pre2.min(0).values - 1.0, pre2.max(0).values + 1.0
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(6):
        splits = [torch.zeros(1, 12, dtype=torch.int8), torch.zeros(1, 12, dtype=torch.int8)]
        inside = torch.ones(len(points), dtype=torch.bool)
        lows, highs = [lo1.clone()[None], lo2.clone()[None]], [hi1.clone()[None], hi2.clone()[None]]
        for layer, pre in ((0, pre1), (1, pre2)):
            for neuron in torch.randperm(12, generator=generator)[:2].tolist():
                sign = 1 if torch.rand(1, generator=generator) < 0.5 else -1
                splits[layer][0, neuron] = sign
                inside &= (pre[:, neuron] >= 0) if sign > 0 else (pre[:, neuron] <= 0)
                if sign > 0:
                    lows[layer][0, neuron] = 0.0
                else:
                    highs[layer][0, neuron] = 0.0
        if inside.sum() < 10:
            continue
        spec = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
        bound, _, _ = lower_bound(chain, spec, lows, highs, splits, x_lo, x_hi, iterations=50, lr_beta=0.5)
        assert torch.all(bound[0] <= values[inside].min(0).values + 1e-9), (bound, values[inside].min(0).values)
        checked += 1
    assert checked >= 3


class _Normalised(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - 0.5) / 2.0)


class _Skip(nn.Module):
    """y = L3 relu(L2 relu(L1 x)) + V x: the input skips to the output, so no chain."""

    def __init__(self, seed: int):
        super().__init__()
        self.body = _mlp(seed, [24, 16, 16, 2])
        torch.manual_seed(seed + 100)
        self.skip = nn.Linear(24, 2, bias=False)

    def forward(self, x):
        return self.body(x) + self.skip(x)

    def as_sequential(self, shift: float = 10.0) -> nn.Sequential:
        """The same function on boxes inside [-shift, shift]: x rides along as relu(x + shift)."""
        l1, l2, l3 = [m for m in self.body if isinstance(m, nn.Linear)]
        eye = torch.eye(24)
        first, second, last = nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 2)
        with torch.no_grad():
            first.weight.copy_(torch.cat([l1.weight, eye]))
            first.bias.copy_(torch.cat([l1.bias, torch.full((24,), shift)]))
            second.weight.copy_(torch.block_diag(l2.weight, eye))
            second.bias.copy_(torch.cat([l2.bias, torch.zeros(24)]))
            last.weight.copy_(torch.cat([l3.weight, self.skip.weight], dim=1))
            last.bias.copy_(l3.bias - shift * self.skip.weight.sum(dim=1))
        return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), last).eval()


def _is_chain(model: Path) -> bool:
    from pipeline.certify.beta_crown import chain_of
    from pipeline.prove import _default_dtype
    from pipeline.prove_cli import load_network

    prover = load_network(model).prover
    with _default_dtype(torch.float64):
        return chain_of(prover._wrap(dense=True), prover.input_shape) is not None


def test_relu_splitting_reads_a_normalised_net_as_a_chain(tmp_path):
    """Normalisation by constants ((x - 0.5) / 2, Sub and Div nodes) before the first Linear is an
    affine segment: β-CROWN and the LP apply, and 1e-3 either side of the MILP's m* is decided."""
    net = _wide_net(0)
    model = _export(_Normalised(net), (24,), tmp_path / "m.onnx")
    assert _is_chain(model)
    lower, upper = -np.ones(24), np.ones(24)
    m_star = exact_minimum(net, np.array([1.0, -1.0]), (lower - 0.5) / 2, (upper - 0.5) / 2)
    prop = tmp_path / "p.vnnlib"
    for delta, expected in [(-1e-3, "unsat"), (1e-3, "sat")]:
        prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star + delta))
        answer = prove_files(model, prop, timeout=30, options=Options(max_split_dims=0))
        assert answer.status == expected, (delta, answer)


def test_relu_splitting_through_auto_lirpa_where_the_net_is_no_chain(tmp_path):
    """A skip connection from the input to the output is no chain (the segment prober refuses it):
    splits then go through auto_LiRPA's reference bounds. Its answers agree with the MILP of an
    equivalent sequential net: unsat below m* where α-CROWN alone did not prove it (phase relu_bab),
    sat above; the old prover answered unknown."""
    net = _Skip(0).eval()
    model = _export(net, (24,), tmp_path / "m.onnx")
    assert not _is_chain(model)
    lower, upper = -np.ones(24), np.ones(24)
    m_star = exact_minimum(net.as_sequential(), np.array([1.0, -1.0]), lower, upper)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star - DELTA_NO_CHAIN))
    answer = prove_files(model, prop, timeout=30, options=Options(max_split_dims=0))
    assert (answer.status, answer.phase) == ("unsat", "relu_bab"), answer
    prop.write_text(_linear_property(24, 2, lower, upper, 0, 1, m_star + 1e-3))
    assert prove_files(model, prop, timeout=30, options=Options(max_split_dims=0)).status == "sat"


DELTA_NO_CHAIN = 0.3  # the reference path has neither β nor the LP: it needs a wider margin


def test_relu_splitting_on_a_convolutional_chain(tmp_path):
    """Conv (stride 2) -> ReLU -> Flatten -> Linear -> ReLU -> Linear is read as a chain (the convolution probed
    into a dense matrix, checked on random points) and decided 1e-3 either side of the exact minimum
    of the same network written with a dense first layer (MILP): a layout slip in the probe would
    break one side."""
    torch.manual_seed(7)
    conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        eye = torch.eye(25).reshape(25, 1, 5, 5)
        dense = nn.Linear(25, 18)
        dense.bias.copy_(conv(torch.zeros(1, 1, 5, 5)).flatten())
        dense.weight.copy_((conv(eye).flatten(1) - dense.bias).t())
    sequential = nn.Sequential(dense, nn.ReLU(), net[3], nn.ReLU(), net[5]).eval()
    model = _export(net, (1, 5, 5), tmp_path / "m.onnx")
    assert _is_chain(model)
    lower, upper = -np.ones(25), np.ones(25)
    m_star = exact_minimum(sequential, np.array([1.0, -1.0]), lower, upper)
    prop = tmp_path / "p.vnnlib"
    weak = Options(max_split_dims=0, pgd_steps=0, pgd_restarts=1)
    for delta, expected in [(-1e-3, "unsat"), (1e-3, "sat")]:
        prop.write_text(_linear_property(25, 2, lower, upper, 0, 1, m_star + delta))
        answer = prove_files(model, prop, timeout=30, options=weak)
        assert answer.status == expected, (delta, m_star, answer)


def test_alpha_crown_stops_at_the_deadline(tmp_path):
    """VNN-COMP scripts kill a tool that overruns its timeout. α-CROWN is one auto_LiRPA call; before,
    it ran all its iterations (here 3000, ~14 s) whatever the deadline. Now auto_LiRPA's stop
    criterion ends it at the deadline with the best (sound) bounds so far."""
    from pipeline.prove_cli import load_network

    net = _mlp(0, [20, 64, 64, 64, 2])
    model = _export(net, (20,), tmp_path / "m.onnx")
    options = Options(alpha_iterations=3000)
    prover = load_network(model, options).prover
    box = torch.ones(1, 20, dtype=torch.float64)
    margin = [(torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))]
    crown = float(prover._lower_bounds(-box, box, margin, "crown"))  # a sound lower bound of Y_0 - Y_1
    prop = tmp_path / "p.vnnlib"  # unsat (below a sound bound); CROWN cannot prove it, α-CROWN needs iterations
    prop.write_text(_linear_property(20, 2, -np.ones(20), np.ones(20), 0, 1, crown + 0.3))
    answer = prove_files(model, prop, timeout=2.0, options=options)
    assert answer.status in ("timeout", "unsat"), answer
    assert answer.seconds < 2.0 + 1.5, answer
