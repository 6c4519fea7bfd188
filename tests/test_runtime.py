"""The `runtime` section: device resolution, precision, sharded evaluation and data-parallel training.

Everything here runs on CPU (the GPU paths are the same code with another `torch.device`). Before
this change there was no `runtime` section (params with one were refused as an unknown key), the
attacks drew from one generator across batches (a shard's random stream would differ from the
one-process run's) and training ran in one process only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.errors import UsageError
from pipeline.io import sha256_file
from pipeline.runtime import block_generator, resolve_device, shard_ranges, start
from tests.conftest import REPO, run_stage


def set_params(root, **sections) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params))


def copy_workspace(source, target):
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def without_timings(value):
    """Metrics with wall-clock fields and the runtime record (it names the process count) dropped."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("seconds", "runtime")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_block_generator_depends_on_seed_and_first_index_only():
    first = torch.rand(5, generator=block_generator(0, 64))
    assert torch.equal(first, torch.rand(5, generator=block_generator(0, 64)))
    assert not torch.equal(first, torch.rand(5, generator=block_generator(0, 128)))
    assert not torch.equal(first, torch.rand(5, generator=block_generator(1, 64)))


def test_shards_cut_on_batch_boundaries_and_cover_every_sample():
    ranges = shard_ranges(100, 3, 25)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % 25 == 0 for start, _ in ranges)
    with pytest.raises(UsageError, match="more processes than batches"):
        shard_ranges(100, 5, 25)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_one_is_refused():
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu") or torch.backends.mps.is_available()


def test_bf16_autocast_runs_the_training_forward_in_bf16_float32_does_not():
    from pipeline.config import RuntimeConfig

    layer = torch.nn.Linear(4, 2)
    with start(RuntimeConfig(device="cpu", precision="bf16")).autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with start(RuntimeConfig(device="cpu")).autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(UsageError, match="fp16"):
        start(RuntimeConfig(device="cpu", precision="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_exits_2_and_writes_nothing(pipeline_workspace, tmp_path, capsys):
    root = copy_workspace(pipeline_workspace, tmp_path / "ws")
    before = sha256_file(root / "metrics" / "attack.json")
    set_params(root, runtime={"device": "cuda"})
    assert run_stage("attack", root) == 2
    assert "runtime.device = 'cuda': no CUDA device" in capsys.readouterr().err
    assert sha256_file(root / "metrics" / "attack.json") == before


def test_more_processes_than_batches_exits_2_and_writes_nothing(pipeline_workspace, tmp_path, capsys):
    root = copy_workspace(pipeline_workspace, tmp_path / "ws")
    before = sha256_file(root / "metrics" / "attack.json")
    set_params(root, runtime={"processes": 2})  # the tiny test split is one batch of attack.batch_size
    assert run_stage("attack", root) == 2
    assert "more processes than batches" in capsys.readouterr().err
    assert sha256_file(root / "metrics" / "attack.json") == before


def test_one_and_two_processes_give_identical_evaluation(pipeline_workspace, tmp_path):
    """attack, certify and smooth with 2 shards: the same metrics and per-sample files as 1 process."""
    outputs = {}
    for processes in (1, 2):
        root = copy_workspace(pipeline_workspace, tmp_path / f"p{processes}")
        set_params(root, attack={"batch_size": 25}, certify={"batch_size": 25},
                   smoothing={"max_samples": 6}, runtime={"processes": processes, "threads": 1})
        for stage in ("attack", "certify", "smooth"):
            assert run_stage(stage, root) == 0, (stage, processes)
        metrics = {stage: json.loads((root / "metrics" / f"{stage}.json").read_text())
                   for stage in ("attack", "certify", "smooth")}
        assert all(m["runtime"]["processes"] == processes for m in metrics.values())
        outputs[processes] = {stage: without_timings(m) for stage, m in metrics.items()}
        for name in ("attack/samples.jsonl", "certify/samples.jsonl", "smooth/samples.jsonl"):
            outputs[processes][name] = (root / "artifacts" / name).read_text()
        outputs[processes]["adversarial"] = sha256_file(root / "artifacts" / "attack" / "adversarial.npz")
    assert outputs[1]["attack"]["n"] > 25  # more than one block: the shards really split the samples
    for key in outputs[1]:
        assert outputs[1][key] == outputs[2][key], key


def _cli(root, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--workspace", str(root)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_training_with_two_gloo_processes(pipeline_workspace, tmp_path):
    """`runtime.processes: 2` makes `robustgate train` run under torchrun (gloo, CPU): one checkpoint,
    one log line, and validation accuracy in the band of the one-process run on the tiny config."""
    root = copy_workspace(pipeline_workspace, tmp_path / "ws")
    (root / "models" / "model.pt").unlink()
    set_params(root, runtime={"processes": 2})
    run = _cli(root, "train")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data-parallel in 2 processes" in run.stdout
    assert run.stdout.count("train: best epoch") == 1  # rank 0 alone reports and writes
    assert (root / "models" / "model.pt").is_file()
    assert not (root / "models" / "train_state.pt").exists()
    one = json.loads((pipeline_workspace / "metrics" / "train.json").read_text())
    two = json.loads((root / "metrics" / "train.json").read_text())
    assert abs(two["best_val_clean_accuracy"] - one["best_val_clean_accuracy"]) <= 0.15
    set_params(root, attack={"batch_size": 50})  # two batches for the two evaluation shards
    assert run_stage("attack", root) == 0  # the checkpoint loads and evaluates


def _dies_once(marker: str, value: int) -> int:
    """A shard task whose process is killed the first time it runs (as an OOM kill would)."""
    from pathlib import Path

    if value == 1 and not Path(marker).exists():
        Path(marker).write_text("killed once")
        os._exit(9)
    return value * 10


def test_a_killed_shard_is_rerun_alone(tmp_path):
    from pipeline.runtime import run_shards

    marker = str(tmp_path / "marker")
    assert run_shards(_dies_once, [(marker, 0), (marker, 1)], threads=1) == [0, 10]
    assert (tmp_path / "marker").read_text() == "killed once"


# A torchrun worker: every training method, data-parallel over 2 gloo ranks, on a tiny mlp. Each rank
# writes the SHA-256 of its weights after every epoch and the class of the training step it ran.
DDP_WORKER = r'''
import hashlib, io, json, sys
import numpy as np
import torch
from pipeline.attacks.pgd import PGD
from pipeline.config import RuntimeConfig
from pipeline.models import build_model
from pipeline.runtime import ShardedShuffle, join, rank_seed, start
from pipeline.threat import Domain, LpBall
from pipeline.training.loop import FitConfig, fit

out = sys.argv[1]
distributed, _ = join(start(RuntimeConfig(device="cpu", threads=1), 2))
data = torch.Generator().manual_seed(0)
x, y = torch.rand(64, 1, 8, 8, generator=data), torch.randint(0, 10, (64,), generator=data)
domain = Domain.from_arrays(np.zeros(1, np.float32), np.ones(1, np.float32))
record = {}
for method, context in METHODS:
    torch.manual_seed(rank_seed(0, distributed.rank))  # each rank builds other weights: DDP must align them
    model = build_model("mlp", [1, 8, 8], 10, {"hidden": [16]})
    cfg = FitConfig(method=method, epochs=2, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                    threat=LpBall("linf", 0.05), epsilon_warmup_epochs=0, train_pgd=PGD(2, 0.02), val_pgd=PGD(1, 0.02),
                    context=context)
    hashes, steps = [], []

    def save_state(state):
        buffer = io.BytesIO()
        torch.save(state.model, buffer)
        hashes.append(hashlib.sha256(buffer.getvalue()).hexdigest())

    def parallel(step):
        wrapped = distributed.data_parallel(step)
        steps.append(type(wrapped).__name__)
        return wrapped

    fit(model, x, y, x[:16], y[:16], domain, cfg, torch.Generator().manual_seed(rank_seed(0, distributed.rank)),
        num_classes=10, shuffle=ShardedShuffle(64, distributed, 0), parallel=parallel,
        agree=distributed.from_main, save_state=save_state)
    record[method + ("/" + context["awp_base"] if "awp_base" in context else "")] = {"hashes": hashes, "steps": steps}
    if distributed.is_main:
        torch.save(model.state_dict(), f"{out}/{method}.pt")
with open(f"{out}/rank{distributed.rank}.json", "w") as handle:
    json.dump(record, handle)
'''

DDP_METHODS = [("standard", {}), ("pgd_at", {}), ("trades", {}), ("mart", {}), ("fast_at", {}),
               ("awp", {"awp_base": "pgd_at"}), ("awp", {"awp_base": "trades"}), ("consistency", {}),
               ("ibp", {}), ("crown_ibp", {"beta_end": 0.5}), ("gaussian", {})]


@pytest.mark.slow
def test_distributed_data_parallel_keeps_ranks_identical_for_every_method(tmp_path):
    """Every method trained by DistributedDataParallel on 2 gloo ranks (whose initial weights differ and whose
    data shares differ): both ranks hold the same weights after every epoch, for the methods that call the
    model several times per batch (PGD's inner autograd.grad, TRADES'/MART's two forwards, AWP's weight
    perturbation, IBP/CROWN-IBP bounds through auto_LiRPA). For standard and IBP training (no random draws)
    the 2-rank result equals one process on the whole batch: the gradients were averaged, bounds included.
    Fails on the code before: the training step did not run under DistributedDataParallel (the gradient
    all-reduce was hand-written, `fit` had no `parallel` hook), and AWP's subtracted restore let ranks drift."""
    from pipeline.models import build_model
    from pipeline.runtime import rank_seed
    from pipeline.threat import Domain, LpBall
    from pipeline.training.loop import FitConfig, fit
    from pipeline.attacks.pgd import PGD
    import numpy as np

    script = tmp_path / "worker.py"
    script.write_text(f"METHODS = {DDP_METHODS!r}\n" + DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(DDP_METHODS)
    for name, record in ranks[0].items():
        assert record["steps"] == ["DistributedDataParallel"], name
        assert len(record["hashes"]) == 2 and record["hashes"] == ranks[1][name]["hashes"], name
        assert record["hashes"][0] != record["hashes"][1], name  # the weights moved

    data = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=data), torch.randint(0, 10, (64,), generator=data)
    domain = Domain.from_arrays(np.zeros(1, np.float32), np.ones(1, np.float32))
    for method in ("standard", "ibp"):
        torch.manual_seed(rank_seed(0, 0))  # rank 0's initial weights, which DDP gave both ranks
        model = build_model("mlp", [1, 8, 8], 10, {"hidden": [16]})
        cfg = FitConfig(method=method, epochs=2, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.0,
                        weight_decay=0.0, threat=LpBall("linf", 0.05), epsilon_warmup_epochs=0, train_pgd=None,
                        val_pgd=PGD(1, 0.02))
        fit(model, x, y, x[:16], y[:16], domain, cfg, torch.Generator().manual_seed(0), num_classes=10)
        two = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        for key, value in model.state_dict().items():
            assert torch.allclose(two[key], value, atol=1e-5), (method, key)
