"""Regenerate the table of what each training method reaches (clean, robust, CROWN-verified).

Runs `robustgate compare` with every method in a temporary copy of the workspace's params on
`digits`, and on the real MNIST test split from ../shared/data/mnist with --mnist (8,000 train /
2,000 test; tens of minutes on 2 cores). Writes bench/results/methods_<dataset>.md.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.cli import main as cli
from pipeline.training.methods import CONDITION_ONLY, METHODS

REPO = Path(__file__).resolve().parents[1]


def run(dataset: str, overrides: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "policies", root / "policies")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        for section, values in overrides.items():
            params.setdefault(section, {}).update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        if dataset == "mnist":
            (root / "data").mkdir()
            shutil.copytree(REPO.parent / "shared" / "data" / "mnist", root / "data" / "mnist")
        assert cli(["prepare", "--workspace", str(root)]) == 0
        lp_methods = [m for m in METHODS if m not in CONDITION_ONLY]  # the others train for a condition
        assert cli(["compare", "--workspace", str(root), "--methods", ",".join(lp_methods), "--samples", "2000"]) == 0
        target = REPO / "bench" / "results" / f"methods_{dataset}.md"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(root / "reports" / "build" / "comparison.md", target)
        print(f"wrote {target}")


if __name__ == "__main__":
    run("digits", {})
    if "--mnist" in sys.argv:
        run("mnist", {"data": {"dataset": "idx", "path": "data/mnist", "val_fraction": 0.1, "test_fraction": 0.2}})
