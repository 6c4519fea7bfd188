"""`robustgate audit REV --repo REPO [--remote DVC_REMOTE] [--registry URI]`: an assessor's re-check.

Clones REPO at REV into a temporary directory, pulls that commit's outputs from the DVC
remote, and proves without re-running a stage that the files are those the commit's
dvc.lock, the report's manifest, the gate's verdict (and, with --registry, the registry's
served model) speak of. Prints a one-page summary; exit 1 naming every missing or changed
file, exit 2 when REV or REPO cannot be read.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from pipeline.errors import IntegrityMismatch, UsageError

HASHED = ("models/model.onnx", "models/model.pt", "data/prepared/data.npz", "reports/build/report.pdf",
          "reports/build/manifest.json", "metrics/gate.json")


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's dvc, whether or not it is on PATH
    return str(beside) if beside.exists() else name


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit {result.returncode}"


def checkout(repo: str, rev: str, into: Path) -> str:
    """Clone `repo` and check out `rev`; returns the commit. Bad repo or rev: UsageError."""
    source = str(Path(repo).resolve()) if Path(repo).exists() else repo
    cloned = _run(["git", "clone", "--quiet", "--no-checkout", source, str(into)], into.parent)
    if cloned.returncode != 0:
        raise UsageError(f"cannot clone {repo}: {_last_line(cloned)}")
    checked = _run(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", rev], into)
    if checked.returncode != 0:
        raise UsageError(f"{rev!r} is not a commit of {repo}: {_last_line(checked)}")
    return _run(["git", "rev-parse", "HEAD"], into).stdout.strip()


def pull(root: Path, remote: Optional[str]) -> tuple[bool, str]:
    """`dvc pull` (from `remote` when given, else the repository's default remote); (ok, last line)."""
    dvc = _tool("dvc")
    args = [dvc, "pull", "--quiet"]
    if remote:
        location = str(Path(remote).resolve()) if "://" not in remote else remote
        added = _run([dvc, "remote", "add", "--local", "--force", "audit", location], root)
        if added.returncode != 0:
            raise UsageError(f"--remote {remote}: {_last_line(added)}")
        args += ["--remote", "audit"]
    pulled = _run(args, root)
    return pulled.returncode == 0, _last_line(pulled)


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 (DVC's content address, compared, not trusted for signing)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def uncached_outputs(root: Path) -> set[str]:
    """Outputs dvc.yaml marks `cache: false` (metrics/, plots/): they travel in git, not the remote."""
    from pipeline.config import read_yaml

    spec = read_yaml(root / "dvc.yaml") if (root / "dvc.yaml").is_file() else {}
    found = set()
    for stage in ((spec or {}).get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage.get(kind) or []) if isinstance(stage, dict) else []:
                if isinstance(entry, dict):
                    found |= {path for path, flags in entry.items()
                              if isinstance(flags, dict) and flags.get("cache") is False}
    return found


def lock_problems(root: Path) -> tuple[list[str], int]:
    """Every cached output dvc.lock names must be in the workspace with the recorded content; an
    uncached one (committed to git) must match the lock when the commit holds it."""
    from pipeline.config import read_yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return ["dvc.lock: absent at this commit, so no pipeline run is recorded"], 0
    stages = (read_yaml(lock) or {}).get("stages") or {}
    uncached = uncached_outputs(root)
    problems, checked = [], 0
    for stage in stages.values():
        for out in stage.get("outs") or []:
            path, digest = root / out["path"], str(out.get("md5", ""))
            if out["path"] in uncached:
                if path.is_file() and digest and _md5(path) != digest:
                    problems.append(f"{out['path']}: the committed file differs from the content dvc.lock records")
                continue
            if digest.endswith(".dir"):
                if not path.is_dir():
                    problems.append(f"{out['path']}/: named by dvc.lock but not pulled (missing from the DVC remote)")
                continue
            checked += 1
            if not path.is_file():
                problems.append(f"{out['path']}: named by dvc.lock but not pulled (missing from the DVC remote)")
            elif digest and _md5(path) != digest:
                problems.append(f"{out['path']}: differs from the content dvc.lock records")
    return problems, checked


def summary_lines(root: Path) -> list[str]:
    """Verdict, headline figures from the typed metrics, the gate table and the key hashes."""
    from pipeline import results
    from pipeline.io import sha256_file
    from pipeline.policy import format_table
    from pipeline.summary import _load, headline
    from pipeline.workspace import Workspace

    lines = headline(_load(Workspace.at(root)))
    gate = root / "metrics" / "gate.json"
    if gate.is_file():
        try:
            lines += ["", format_table([SimpleNamespace(**row) for row in results.load("gate", gate)["rows"]])]
        except UsageError as error:  # verify names the file; the summary says it cannot show it
            lines += ["", f"gate table unavailable: {error}"]
    lines += ["", "SHA-256:"]
    for name in HASHED:
        path = root / name
        lines.append(f"  {name:<28} {sha256_file(path) if path.is_file() else 'MISSING'}")
    return lines


def audit(rev: str, repo: str, remote: Optional[str] = None, registry: Optional[str] = None,
          public_key: Optional[Path] = None, keep: Optional[Path] = None) -> int:
    from pipeline.verify_cli import check, print_findings

    if keep is not None and keep.exists():
        raise UsageError(f"--keep {keep}: exists already; give a new directory")
    with tempfile.TemporaryDirectory(prefix="robustgate-audit-") as scratch:
        root = keep.resolve() if keep is not None else Path(scratch) / "workspace"
        root.parent.mkdir(parents=True, exist_ok=True)
        commit = checkout(repo, rev, root)
        pulled, last = pull(root, remote)
        problems, checked_outs = lock_problems(root)
        if not pulled and not problems:
            problems.append(f"dvc pull failed: {last}")
        states: list[str] = []
        checked = 0
        try:
            found, states, checked, _ = check(root, public_key, registry)
            problems += found
        except UsageError as error:  # no manifest at all: say which file, as a mismatch
            problems.append(str(error))
        print(f"audit: {repo} at {rev} = commit {commit[:12]}; outputs pulled from "
              f"{remote or 'the default DVC remote'} ({'complete' if pulled else 'INCOMPLETE'})")
        print("\n".join(summary_lines(root)))
        print()
        print_findings("audit", states, problems)
        if problems:
            raise IntegrityMismatch(f"{len(problems)} problem(s) in the evidence of {commit[:12]}; first: {problems[0]}")
        print(f"audit: OK, {checked_outs} DVC outputs match dvc.lock and {checked} artifacts match the manifest "
              f"of commit {commit[:12]}" + (f"; kept in {root}" if keep is not None else ""))
    return 0
