"""Check the training goals on digits with the pipeline's own stages (see bench/goals.yaml).

For each goal configuration: copy the repo's params, apply the overrides, run `prepare`,
`train`, `attack` and `certify` in a temporary workspace, and tabulate training seconds,
clean and robust accuracy (worst case over the attack stage's attacks, an upper bound) and
verified accuracy (CROWN and the union of sound methods, lower bounds), each with its 95%
interval. Writes bench/results/goals_digits.md. About 5 minutes per entry on 2 cores.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.cli import main as cli
from pipeline.config import train_section_for

REPO = Path(__file__).resolve().parents[1]


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def goal_params(base: dict, common: dict, override: dict) -> dict:
    """params.yaml with the common and the goal's overrides; a goal that switches `train.method`
    drops the settings of the method it replaces (no settings of the new one: an error otherwise)."""
    params = merged(merged(base, common), override)
    params["train"] = train_section_for(params["train"], params["train"]["method"])
    return params


def cell(stat: dict) -> str:
    lo, hi = stat["ci"]
    return f"{100 * stat['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def run_goal(name: str, entry: dict, common: dict) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "policies", root / "policies")
        params = goal_params(yaml.safe_load((REPO / "params.yaml").read_text()), common, entry["params"])
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in ("prepare", "train", "attack", "certify"):
            assert cli([stage, "--workspace", str(root)]) == 0, stage
        metric = {s: json.loads((root / "metrics" / f"{s}.json").read_text()) for s in ("train", "attack", "certify")}
    attack, certify = metric["attack"], metric["certify"]
    clean, robust = attack["clean_accuracy"], attack["robust_accuracy"]
    crown = certify["verified_accuracy"]["crown"]
    union = certify["verified_accuracy"].get("any", crown)
    overrides = "; ".join(f"{k}: {json.dumps(v, separators=(', ', ': '))}" for k, v in entry["params"].items())
    return (f"| {name} | {entry['goal']} | {metric['train']['seconds']:.0f} | {cell(clean)} | {cell(robust)} | "
            f"{cell(crown)} | {cell(union)} | {attack['n']} | {overrides} |")


def main() -> None:
    spec = yaml.safe_load((Path(__file__).parent / "goals.yaml").read_text())
    chosen = sys.argv[1:] or list(spec["goals"])
    rows = [run_goal(name, spec["goals"][name], spec.get("common", {})) for name in chosen]
    text = "\n".join([
        "Goal configurations on digits, L∞ ε = 0.1, produced by `python bench/goals.py` (stages prepare, train,",
        "attack, certify of the pipeline; 95% Clopper-Pearson intervals). Robust: worst case over the attack",
        "stage's attacks (FGSM, PGD-50×2, APGD-CE, APGD-T, Square-1000), an upper bound. Verified: CROWN, and",
        "any of IBP / CROWN-IBP / CROWN per sample, lower bounds. Train s: wall-clock seconds on this machine.",
        "",
        "| config | goal | train s | clean | robust | verified (CROWN) | verified (any method) | n | overrides of params.yaml |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    target = REPO / "bench" / "results" / "goals_digits.md"
    target.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
