"""Training methods, schedules, early stopping, catastrophic-overfitting guard and exact resumption."""
import copy

import pytest
import torch

from pipeline.attacks.pgd import PGD
from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.errors import UsageError
from pipeline.models import build_model
from pipeline.threat import Domain, LpBall
from pipeline.training.loop import FitConfig, TrainingDiverged, epoch_epsilon, fit, learning_rate
from pipeline.training.methods import CONDITION_ONLY, METHODS, jensen_shannon, kl_divergence


@pytest.fixture(scope="module")
def small_data():
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0, max_samples=300)
    tensors = {s: (torch.as_tensor(data.x[s]), torch.as_tensor(data.y[s])) for s in ("train", "val")}
    return tensors, Domain.from_arrays(data.lower, data.upper)


def config(method="pgd_at", epochs=2, epsilon=0.1, norm="linf", **overrides):
    base = dict(method=method, epochs=epochs, batch_size=64, optimizer="adam", lr=0.005, momentum=0.9,
                weight_decay=0.0, threat=LpBall(norm, epsilon), epsilon_warmup_epochs=0, train_pgd=PGD(3, 0.04),
                val_pgd=PGD(3, 0.04))
    base.update(overrides)
    return FitConfig(**base)


def run(small_data, cfg, seed=0, model_name="cnn_small", **kwargs):
    (x, y), (xv, yv) = small_data[0]["train"], small_data[0]["val"]
    torch.manual_seed(seed)
    model = build_model(model_name, (1, 8, 8), 10, {"channels": [4, 8], "dense": 16} if model_name == "cnn_small" else {"hidden": [16]})
    before = copy.deepcopy(model.state_dict())
    result = fit(model, x, y, xv, yv, small_data[1], cfg, torch.Generator().manual_seed(seed), num_classes=10,
                 **kwargs)
    return model, before, result


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(CONDITION_ONLY)))  # those: test_condition_training
def test_every_method_trains(small_data, method):
    model, before, result = run(small_data, config(method, epochs=1))
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_learning_rate_schedules():
    assert learning_rate(config(lr_schedule="constant"), 0.9) == 0.005
    assert learning_rate(config(lr_schedule="cosine"), 0.0) == pytest.approx(0.005)
    assert learning_rate(config(lr_schedule="cosine"), 0.5) == pytest.approx(0.0025)
    assert learning_rate(config(lr_schedule="piecewise"), 0.6) == pytest.approx(0.0005)
    assert learning_rate(config(lr_schedule="piecewise"), 0.8) == pytest.approx(0.00005)


def test_resume_ends_with_the_same_weights(small_data):
    uninterrupted, _, full = run(small_data, config(epochs=4))
    states = []
    run(small_data, config(epochs=2), save_state=states.append)  # "killed" after epoch 2
    saved = copy.deepcopy(states[-1])
    resumed, _, result = run(small_data, config(epochs=4), resume=saved)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert result.best_epoch == full.best_epoch


def test_training_epsilon_ramps_to_its_own_radius_and_validates_at_the_threat(small_data):
    cfg = config("ibp", epochs=5, epsilon_warmup_epochs=2, epsilon=0.02, train_epsilon=0.04)
    assert [epoch_epsilon(cfg, e) for e in range(3)] == pytest.approx([0.02, 0.04, 0.04])
    assert epoch_epsilon(config(epsilon_warmup_epochs=2), 1) == pytest.approx(0.1)  # default: the threat's ε
    _, _, result = run(small_data, cfg, model_name="mlp")
    assert [r["epsilon"] for r in result.history] == pytest.approx([0.02, 0.04, 0.04, 0.04, 0.04])
    # Certified training keeps the epoch with the best verified (not attacked) validation accuracy,
    # among epochs at full training ε only.
    eligible = result.history[1:]
    best = max(eligible, key=lambda r: r["val_verified_accuracy"])
    assert result.best_epoch == best["epoch"]
    assert all(r["val_verified_accuracy"] <= r["val_robust_accuracy"] + 1e-9 for r in result.history)


def test_early_stopping(small_data):
    _, _, result = run(small_data, config(epochs=30, lr=1e-6, early_stopping_patience=2))
    assert result.stopped == "early_stopping" and len(result.history) < 30


def test_fast_at_catastrophic_overfitting_restores_the_best_epoch(small_data):
    def collapse_after_epoch_2(row):  # what catastrophic overfitting looks like: robustness vanishes at once
        if row["epoch"] == 2:
            with torch.no_grad():
                for parameter in model_box[0].parameters():
                    parameter.mul_(0.0)

    model_box = []
    (x, y), (xv, yv) = small_data[0]["train"], small_data[0]["val"]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, {"hidden": [32]})
    model_box.append(model)
    cfg = config("fast_at", epochs=6, lr=0.01, catastrophic_drop=0.05, epsilon=0.05)
    result = fit(model, x, y, xv, yv, small_data[1], cfg, torch.Generator().manual_seed(0), on_epoch=collapse_after_epoch_2,
                 num_classes=10)
    assert result.stopped == "catastrophic_overfitting"
    assert len(result.history) == 3 and result.best_epoch in (1, 2)
    assert any(v.abs().sum() > 0 for v in result.best_state.values())  # the restored weights are pre-collapse


def test_nan_loss_names_epoch_and_batch(small_data):
    with pytest.raises(TrainingDiverged, match=r"epoch \d+, batch \d+"):
        run(small_data, config("standard", epochs=3, lr=1e12, optimizer="sgd"))


@pytest.mark.parametrize("change,fragment", [
    ({"method": "trades", "beta": -1.0}, "train.beta = -1.0"),
    ({"pgd": {"steps": 0}}, "train.pgd.steps = 0"),
    ({"pgd": {"step_size": 0.0}}, "train.pgd.step_size = 0.0"),
    ({"method": "gaussian", "noise_sigma": 0.0}, "train.noise_sigma = 0.0"),
    ({"method": "freeat"}, "train.method = 'freeat'"),
    ({"lr_schedule": "linear"}, "train.lr_schedule = 'linear'"),
    ({"epsilon": 0.0}, "train.epsilon = 0.0"),
    ({"method": "crown_ibp", "beta_end": 1.5}, "train.beta_end = 1.5"),
])
def test_bad_training_params(change, fragment):
    with pytest.raises(UsageError) as info:
        parse_params({"train": change})
    assert fragment in str(info.value)


def test_finetune_head_only_and_mismatch(tmp_path, pipeline_workspace):
    import shutil

    import yaml

    from tests.conftest import run_stage

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    shutil.copytree(root / "models", root / "base")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update({"init_checkpoint": "base", "finetune": "head", "epochs": 1, "method": "trades"})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("train", root) == 0
    before = torch.load(root / "base/model.pt", weights_only=True)
    after = torch.load(root / "models/model.pt", weights_only=True)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = sorted(before)[-1].rsplit(".", 1)[0]  # the final Linear layer
    assert changed and all(k.startswith(last) for k in changed)
    params["model"] = {"name": "mlp", "hidden": [7]}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("train", root) == 2


def test_resume_without_state_is_a_clear_error(pipeline_workspace, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    assert main(["train", "--workspace", str(root), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_compare_writes_table_and_plot(pipeline_workspace, tmp_path, capsys):
    import json
    import shutil

    from pipeline.cli import main

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    assert main(["compare", "--workspace", str(root), "--methods", "standard,pgd_at", "--samples", "60"]) == 0
    result = json.loads((root / "reports/build/comparison.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["standard", "pgd_at"]
    for row in result["rows"]:
        assert row["robust"]["value"] <= row["clean"]["value"] and row["clean"]["n"] == 60
        assert row["verified_crown"]["value"] <= row["robust"]["value"]
    table = (root / "reports/build/comparison.md").read_text()
    assert "| standard |" in table and "| pgd_at |" in table
    assert (root / "reports/build/comparison.png").stat().st_size > 5000
    assert main(["compare", "--workspace", str(root), "--methods", "freeat"]) == 2
    assert "unknown ['freeat']" in capsys.readouterr().err
    # --collect rebuilds the table from the rows, and refuses a row trained under other params.
    (root / "reports/build/comparison.md").unlink()
    assert main(["compare", "--workspace", str(root), "--collect"]) == 0
    assert "| pgd_at |" in (root / "reports/build/comparison.md").read_text()
    row_file = root / "reports/build/rows/standard.json"
    good = json.loads(row_file.read_text())
    for field in ("study_key", "dataset_fingerprint"):  # other params, other data
        row_file.write_text(json.dumps({**good, field: "0" * 64}))
        capsys.readouterr()
        assert main(["compare", "--workspace", str(root), "--collect"]) == 2
        assert "standard.json" in capsys.readouterr().err
    # the rows ran on the runtime's threads; another thread count trains another model, so --collect refuses
    # them (processes, which a row does not use, is not part of the key)
    import yaml

    row_file.write_text(json.dumps(good))
    assert good["runtime"]["threads"] == torch.get_num_threads() and good["runtime"]["processes"] == 1
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runtime"] = {**params.get("runtime", {}), "processes": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["compare", "--workspace", str(root), "--collect"]) == 0
    params["runtime"]["threads"] = good["runtime"]["threads"] + 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert main(["compare", "--workspace", str(root), "--collect"]) == 2
    assert "trained under other params" in capsys.readouterr().err


def test_interrupted_stage_resumes_to_identical_weights(pipeline_workspace, tmp_path):
    """Kill `robustgate train` after its second epoch, resume, and compare with an uninterrupted run."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from pipeline.io import sha256_file
    from tests.conftest import run_stage

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 30  # long enough to be killed mid-run
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("train", root) == 0
    reference = sha256_file(root / "models/model.pt")
    (root / "models/model.pt").unlink()
    state = root / "models/train_state.pt"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--workspace", str(root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert state.exists(), "the run finished before it could be interrupted"
    from pipeline.cli import main

    assert main(["train", "--workspace", str(root), "--resume"]) == 0
    assert sha256_file(root / "models/model.pt") == reference
    assert not state.exists()


def test_compare_survives_a_diverging_method(pipeline_workspace, tmp_path):
    import json
    import shutil

    import yaml

    from pipeline.cli import main

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update({"lr": 1.0e12, "optimizer": "sgd", "epochs": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["compare", "--workspace", str(root), "--methods", "standard", "--samples", "20"]) == 0
    row = json.loads((root / "reports/build/comparison.json").read_text())["rows"][0]
    assert row["clean"]["value"] == "diverged" and "epoch" in row["clean"]["reason"]
    assert "| standard | diverged |" in (root / "reports/build/comparison.md").read_text()


def test_divergences_match_their_definitions_and_keep_finite_gradients_when_saturated():
    a, b = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.randn(6, 10)
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    assert float(kl_divergence(a, b)) == pytest.approx(float((p * (p / q).log()).sum(1).mean()), rel=1e-5)
    expected_js = float(((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2)
    assert float(jensen_shannon(a, b)) == pytest.approx(expected_js, rel=1e-5)
    # Logit gaps beyond ~104 underflow float32 probabilities to 0: the cause of consistency
    # training's NaN on MNIST (and a latent one in TRADES) when written with probabilities.
    sat_a = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    sat_b = torch.tensor([[0.0, 200.0, 0.0]], requires_grad=True)
    for loss in (kl_divergence(sat_a, sat_b), jensen_shannon(sat_a, sat_b)):
        grads = torch.autograd.grad(loss, (sat_a, sat_b))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert float(jensen_shannon(sat_a, sat_b).detach()) == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_crown_ibp_beta_end_mixes_the_two_bounds_after_the_ramp(small_data):
    from pipeline.certify.bounds import BoundComputer
    from pipeline.training.methods import BatchContext

    (x, y), domain = small_data[0]["train"], small_data[1]
    x, y = x[:32], y[:32]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, {"hidden": [16]})
    bounds = BoundComputer(model, (1, 8, 8), domain)

    def loss(method, beta_end):
        ctx = BatchContext(LpBall("linf", 0.05), domain, None, torch.Generator().manual_seed(0), 10, ramp=1.0,
                           kappa_end=0.0, beta_end=beta_end, bounds=bounds)
        return float(METHODS[method](model, x, y, ctx).detach())

    ibp_only, crown_only, half = loss("ibp", 0.0), loss("crown_ibp", 1.0), loss("crown_ibp", 0.5)
    assert loss("crown_ibp", 0.0) == pytest.approx(ibp_only)  # the paper's schedule ends at pure IBP
    assert crown_only != pytest.approx(ibp_only)
    # κ_end = 0: the loss is the CE of the worst-case logits from β·CROWN-IBP + (1-β)·IBP lower bounds,
    # convex in β, so the even mix costs at most the mean of the two pure losses.
    assert half <= (ibp_only + crown_only) / 2 + 1e-6


def test_fit_config_passes_every_setting_of_the_method():
    """Each setting a method accepts reaches the loop (before, `train.pgd.schedule` and
    `train.val_pgd.schedule` were accepted and dropped)."""
    from pipeline.stages.train import fit_config
    from pipeline.training.methods import BatchContext

    params = parse_params({"train": {"pgd": {"steps": 4, "step_size": 0.01, "schedule": "cosine"},
                                     "val_pgd": {"steps": 5, "step_size": 0.02, "restarts": 3, "schedule": "cosine"}}})
    cfg = fit_config(params)
    assert cfg.train_pgd.settings() == {"steps": 4, "step_size": 0.01, "restarts": 1, "loss": "ce", "schedule": "cosine"}
    assert cfg.val_pgd.settings() == {"steps": 5, "step_size": 0.02, "restarts": 3, "loss": "ce", "schedule": "cosine"}
    for method, own in [("trades", {"beta": 2.0}), ("mart", {"beta": 3.0}),
                        ("awp", {"awp_gamma": 0.01, "awp_base": "trades", "beta": 1.0}),
                        ("consistency", {"consistency_weight": 2.0, "consistency_temperature": 0.7}),
                        ("fast_at", {"fast_at_step_factor": 1.0, "catastrophic_drop": 0.3}),
                        ("ibp", {"kappa_end": 0.2}), ("crown_ibp", {"kappa_end": 0.2, "beta_end": 0.4}),
                        ("gaussian", {"noise_sigma": 0.5}), ("standard", {})]:
        cfg = fit_config(parse_params({"train": {"method": method, **own}}))
        reached = {**cfg.context, "catastrophic_drop": cfg.catastrophic_drop, "noise_sigma": cfg.noise_sigma}
        assert own.items() <= reached.items(), method
        BatchContext(LpBall("linf", 0.1), None, cfg.train_pgd, torch.Generator(), 10, **cfg.context)  # all are its fields
