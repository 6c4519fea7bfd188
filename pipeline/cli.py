"""`robustgate <command>`: one command per pipeline stage (each also a DVC stage), plus
registry and integrity tools.

Exit codes: 0 success, 1 the evidence falls short (gate, soundness, parity,
tampering, registry refusal), 2 bad input (params, data, model, policy) with one
line saying what is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.errors import EvidenceError, UsageError

STAGES = {
    "prepare": "load, validate, split and fingerprint the dataset",
    "train_threat": "write what of the conditions section training uses (the file train depends on)",
    "train": "train the model with train.method (adversarial, certified or noise training)",
    "attack": "robust accuracy under the worst case of FGSM, PGD, APGD and Square, with intervals",
    "certify": "IBP and CROWN verified accuracy through auto_LiRPA, cross-checked",
    "smooth": "randomized-smoothing certificates (Cohen et al. 2019) at σ",
    "clinical": "sensitivity, specificity, PPV, NPV clean/robust/verified, calibration, abstention, subgroups",
    "conditions": "worst case and certificates under the triggering conditions (brightness, rotation, ...)",
    "export": "export to ONNX and check onnxruntime parity with torch",
    "properties": "write the certified claims as VNNLIB and decide the listed VNNLIB instances",
    "report": "render the self-contained HTML audit report",
    "gate": "check the metrics against the policy; exit 1 when a blocking requirement fails",
    "register": "log the run to MLflow, register the ONNX model, move aliases",
}
TOOLS = {
    "status": ("pipeline.registry_cli", "list registered versions, aliases, verdicts and hashes"),
    "rollback": ("pipeline.registry_cli", "move alias 'approved' back to the previously approved version"),
    "compare": ("pipeline.compare", "train and evaluate several training methods side by side (table and plot)"),
    "verify": ("pipeline.verify_cli", "re-hash every artifact in the manifest and check its signature; exit 1 on any mismatch"),
    "summary": ("pipeline.summary", "the headline figures of the last run in about ten lines"),
    "plots": ("pipeline.plots_page", "draw plots/*.json into one self-contained HTML page (works offline)"),
    "audit": ("pipeline.audit", "clone a commit, dvc pull its evidence and verify it without re-running; one-page summary"),
    "prove": ("pipeline.prove_cli", "decide a VNNLIB property on an ONNX file: sat (with counterexample), unsat, unknown, timeout"),
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
        if name == "verify":
            command.add_argument("directory", type=Path, nargs="?", default=Path("."),
                                 help="workspace or folder holding manifest.json (default: .)")
            command.add_argument("--public-key", type=Path, help="trusted Ed25519 public key (PEM)")
            command.add_argument("--registry", metavar="TRACKING_URI",
                                 help="also check that this MLflow registry serves the report's model.onnx byte for byte")
            continue
        if name == "audit":
            command.add_argument("rev", help="the git commit, tag or branch to audit")
            command.add_argument("--repo", required=True, help="git repository (path or URL) holding REV")
            command.add_argument("--remote", help="DVC remote to pull from (default: the repository's default remote)")
            command.add_argument("--registry", metavar="TRACKING_URI",
                                 help="also check that this MLflow registry serves the report's model.onnx byte for byte")
            command.add_argument("--public-key", type=Path, help="trusted Ed25519 public key (PEM)")
            command.add_argument("--keep", type=Path, help="clone into this new directory and keep it")
            continue
        if name == "prove":
            command.add_argument("model", type=Path, help="the ONNX file")
            command.add_argument("property", type=Path, help="the VNNLIB property")
            command.add_argument("--timeout", type=float, required=True, help="seconds (VNN-COMP: per instance)")
            command.add_argument("--result", type=Path, help="write the answer here in the VNN-COMP result format")
            continue
        command.add_argument("--workspace", type=Path, default=Path("."), help="project root (default: .)")
        command.add_argument("--params", default="params.yaml", help="params file inside the workspace")
        if name == "train":
            command.add_argument("--resume", action="store_true", help="continue after the last finished epoch")
        if name == "compare":
            command.add_argument("--methods", default="standard,pgd_at,trades",
                                 help="comma-separated training methods (default: standard,pgd_at,trades)")
            command.add_argument("--samples", type=int, default=450, help="test samples to evaluate")
            command.add_argument("--out", default="reports/build", help="folder for rows/, the table and the plot")
            mode = command.add_mutually_exclusive_group()
            mode.add_argument("--rows-only", action="store_true", help="write the methods' rows, no table")
            mode.add_argument("--collect", action="store_true",
                              help="build the table and plot from the rows already in OUT/rows (no training)")
        if name == "plots":
            command.add_argument("--out", default="reports/build/plots.html", help="the HTML page to write")
        if name == "gate":
            command.add_argument("--explain", action="store_true", help="say why each requirement passed or failed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        from pipeline.verify_cli import verify

        return _run(args.command, lambda: verify(args.directory, args.public_key, args.registry))
    if args.command == "audit":
        from pipeline.audit import audit

        return _run(args.command, lambda: audit(args.rev, args.repo, args.remote, args.registry, args.public_key,
                                                args.keep))
    if args.command == "prove":
        from pipeline.prove_cli import prove

        return _run(args.command, lambda: prove(args.model, args.property, args.timeout, args.result))
    options = {k: v for k, v in vars(args).items() if k not in ("command", "workspace", "params")}
    return _run(args.command, lambda: _dispatch(args.command, args.workspace, args.params, options))


def _dispatch(command: str, workspace: Path, params: str, options: dict) -> int:
    from pipeline.io import confine
    from pipeline.workspace import Workspace

    confine(params, workspace, "--params")  # a params file outside the workspace is refused
    ws = Workspace.at(workspace, params)
    if str(ws.root) not in sys.path:
        sys.path.insert(0, str(ws.root))  # `model.name: module:callable` resolves in the workspace
    if command in TOOLS:
        return getattr(importlib.import_module(TOOLS[command][0]), command)(ws, **options)
    return importlib.import_module(f"pipeline.stages.{command}").main(ws, **options)


def _run(command: str, call) -> int:
    """Map the error types to exit codes and one readable line."""
    try:
        return call()
    except UsageError as error:
        print(f"robustgate {command}: error: {error}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # last resort; readers name the file themselves
        print(f"robustgate {command}: error: an input file is not valid JSON or UTF-8 ({error}); "
              "re-run the stage that writes it", file=sys.stderr)
        return 2
    except EvidenceError as error:
        print(f"robustgate {command}: {error.prefix}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"robustgate {command}: interrupted; no outputs were replaced", file=sys.stderr)
        return 130
