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
    """Metrics with wall-clock fields dropped (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
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
        outputs[processes] = {
            stage: without_timings(json.loads((root / "metrics" / f"{stage}.json").read_text()))
            for stage in ("attack", "certify", "smooth")}
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
