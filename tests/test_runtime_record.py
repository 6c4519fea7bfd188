"""The thread count, torch build and CPU kernel set shape the figures (a 1-thread and a 2-thread
run of the default params train different models), so every computing stage records them and the
report names them. Before this record the report said only which machine rendered it."""
from __future__ import annotations

import copy
import json

import torch

from pipeline import claims, results
from pipeline.runtime import KERNEL_VARIABLES, cpu_identity, kernel_environment
from tests.conftest import TINY_PARAMS, make_workspace, run_stage


def test_every_computing_stage_records_its_runtime(pipeline_workspace):
    for stage in claims.RUNTIME_STAGES:
        record = json.loads((pipeline_workspace / "metrics" / f"{stage}.json").read_text())["runtime"]
        assert record["device"] == "cpu"
        assert record["threads"] >= 1 and record["processes"] == 1
        assert record["torch"] == torch.__version__
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert record["cpu"] == cpu_identity() and record["gpu"] is None
        assert record["environment"] == kernel_environment()
        results.load(stage, pipeline_workspace / "metrics" / f"{stage}.json")  # the schema accepts it
    html = (pipeline_workspace / "reports" / "build" / "report.html").read_text()
    assert "Computed with" in html and f"torch {torch.__version__}" in html
    assert f"CPU {cpu_identity()}" in html


def test_threads_from_params_are_the_ones_recorded(tmp_path):
    params = copy.deepcopy(TINY_PARAMS)
    params["runtime"] = {"threads": 1}
    params["train"]["epochs"] = 1
    root = make_workspace(tmp_path, params)
    previous = torch.get_num_threads()
    try:
        assert run_stage("prepare", root) == 0 and run_stage("train", root) == 0
    finally:
        torch.set_num_threads(previous)
    assert json.loads((root / "metrics" / "train.json").read_text())["runtime"]["threads"] == 1


def test_runtime_sentence_groups_stages_that_computed_alike():
    one = {"device": "cpu", "threads": 2, "processes": 1, "precision": "float32", "torch": "2.13.0+cpu",
           "cpu_capability": "AVX2", "cpu": "GenuineIntel family 6 model 85 stepping 7 (Xeon), flags 0123456789ab"}
    sharded = {**one, "threads": 1, "processes": 2}
    text = claims.runtime_used({"train": {"runtime": one}, "attack": {"runtime": sharded},
                                "certify": {"runtime": one}, "smooth": {}})
    assert "train and certify: cpu, 1 process of 2 threads" in text
    assert "attack: cpu, 2 processes of 1 thread," in text
    assert "smooth" not in text.split(".")[0]
    assert "CPU GenuineIntel family 6 model 85 stepping 7" in text and "processor" in text
    other_cpu = {**one, "cpu": "AuthenticAMD family 25 model 17 stepping 1 (EPYC), flags ba9876543210"}
    split = claims.runtime_used({"train": {"runtime": one}, "certify": {"runtime": other_cpu}})
    assert "train: cpu" in split and "certify: cpu" in split  # another processor is another group
    assert claims.runtime_used({}).startswith("not recorded")


def test_a_kernel_variable_is_recorded_and_printed(tmp_path, monkeypatch):
    """MKL_CBWR=AVX2 trains another model while torch still reports the same kernel set, so a run made
    under it must say so."""
    for name in KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    params = copy.deepcopy(TINY_PARAMS)
    params["train"]["epochs"] = 1
    root = make_workspace(tmp_path, params)
    previous = torch.get_num_threads()
    try:
        assert run_stage("prepare", root) == 0 and run_stage("train", root) == 0
    finally:
        torch.set_num_threads(previous)
    record = json.loads((root / "metrics" / "train.json").read_text())["runtime"]
    assert record["environment"] == {"MKL_CBWR": "AVX2"}
    assert ", with MKL_CBWR=AVX2" in claims.runtime_used({"train": {"runtime": record}})
    unset = {**record, "environment": {}}
    text = claims.runtime_used({"train": {"runtime": record}, "certify": {"runtime": unset}})
    assert "train: cpu" in text and "certify: cpu" in text  # another variable is another group
    assert "none of OMP_NUM_THREADS, MKL_NUM_THREADS, MKL_CBWR" in text
    older = {key: value for key, value in record.items() if key != "environment"}  # a record from before the field
    assert "thread and kernel variables not recorded" in claims.runtime_used({"train": {"runtime": older}})
    assert "none of" not in claims.runtime_used({"train": {"runtime": older}})
