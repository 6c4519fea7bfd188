"""`robustgate <command>`: one command per pipeline stage (each also a DVC stage), plus
registry and integrity tools.

Exit codes: 0 success, 1 the evidence falls short (gate, soundness, parity,
tampering, registry refusal), 2 bad input (params, data, model, policy) with one
line saying what is wrong.
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
TOOLS = {
    "status": ("pipeline.registry_cli", "list registered versions, aliases, verdicts and hashes"),
    "rollback": ("pipeline.registry_cli", "move alias 'approved' back to the previously approved version"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustgate",
        description="Robustness evidence pipeline. Stages run in the order listed; the rest are tools.",
    )
    parser.add_argument("--version", action="version", version=f"robustgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in {**STAGES, **{k: v[1] for k, v in TOOLS.items()}}.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--workspace", type=Path, default=Path("."), help="project root (default: .)")
        command.add_argument("--params", default="params.yaml", help="params file inside the workspace")
        if name == "gate":
            command.add_argument("--explain", action="store_true", help="say why each requirement passed or failed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.workspace import Workspace

    ws = Workspace.at(args.workspace, args.params)
    if str(ws.root) not in sys.path:
        sys.path.insert(0, str(ws.root))  # `model.name: module:callable` resolves in the workspace
    options = {k: v for k, v in vars(args).items() if k not in ("command", "workspace", "params")}
    try:
        if args.command in TOOLS:
            module = importlib.import_module(TOOLS[args.command][0])
            return getattr(module, args.command)(ws, **options)
        module = importlib.import_module(f"pipeline.stages.{args.command}")
        return module.main(ws, **options)
    except UsageError as error:
        print(f"robustgate {args.command}: error: {error}", file=sys.stderr)
        return 2
    except GateFailed as error:
        print(f"robustgate {args.command}: FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"robustgate {args.command}: interrupted; no outputs were replaced", file=sys.stderr)
        return 130
