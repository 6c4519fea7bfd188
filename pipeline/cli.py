"""`robustgate <stage>`: one command per pipeline stage, each also a DVC stage.

Exit codes: 0 success, 1 the evidence falls short (gate, soundness, parity),
2 bad input (params, data, model, policy) with one line saying what is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.errors import GateFailed, UsageError

STAGES = {
    "prepare": "load, validate, split and fingerprint the dataset",
    "train": "train the model (standard or PGD adversarial training)",
    "attack": "FGSM and PGD robust accuracy on the test split, with intervals",
    "certify": "IBP and CROWN verified accuracy through auto_LiRPA, cross-checked",
    "export": "export to ONNX and check onnxruntime parity with torch",
    "report": "render the self-contained HTML audit report",
    "gate": "check the metrics against the policy; exit 1 when a blocking requirement fails",
    "register": "log the run to MLflow, register the ONNX model, move aliases",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustgate", description="Robustness evidence pipeline. Stages run in this order:"
    )
    parser.add_argument("--version", action="version", version=f"robustgate {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--workspace", type=Path, default=Path("."), help="project root (default: .)")
        stage.add_argument("--params", default="params.yaml", help="params file inside the workspace")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.workspace import Workspace

    ws = Workspace.at(args.workspace, args.params)
    try:
        module = importlib.import_module(f"pipeline.stages.{args.stage}")
        return module.main(ws)
    except UsageError as error:
        print(f"robustgate {args.stage}: error: {error}", file=sys.stderr)
        return 2
    except GateFailed as error:
        print(f"robustgate {args.stage}: FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"robustgate {args.stage}: interrupted; no outputs were replaced", file=sys.stderr)
        return 130
