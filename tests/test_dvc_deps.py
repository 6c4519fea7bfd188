"""Every DVC stage lists, as deps, every module of the package its command imports.

The closure is computed statically with `ast` over `pipeline.*` imports, including imports
inside functions (the lazily imported ones), starting from the command's entry points: the CLI
(`pipeline/cli.py` runs every stage and imports `pipeline.workspace` for each) and the module
the command maps to (`pipeline/stages/<stage>.py`, `pipeline/compare.py` for the study).
A dep directory covers every module below it. On the code before this change the test names
`pipeline/threat.py` missing from `train`, `attack` and `certify`, among others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = "pipeline"
# What `robustgate <stage>` imports before it reaches the stage module: cli.py at module level,
# then `pipeline.workspace` in main(). The verify/TOOLS branches of main() are other commands.
CLI_ENTRY = ("pipeline.cli", "pipeline.workspace")
STUDY_ENTRY = ("pipeline.compare",)


def module_file(name: str) -> Path | None:
    """The file of module `pipeline.x.y` in the repository, or None when it is not a module."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """`pipeline.*` modules imported anywhere in the file (module level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def closure(entries: tuple[str, ...], shallow: tuple[str, ...] = ()) -> set[Path]:
    """Files of every module reachable from `entries`, with the packages' __init__ files.
    Modules in `shallow` contribute their module-level imports only."""
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            prefix = ".".join(parts[:i])
            path = module_file(prefix)
            if path is None or path in seen:
                continue
            seen.add(path)
            package = prefix if path.name == "__init__.py" else ".".join(prefix.split(".")[:-1])
            if prefix in shallow:
                tree = ast.parse(path.read_text(encoding="utf-8"))
                todo.extend(a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names)
                todo.extend(n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module)
            else:
                todo.extend(imported_modules(path, package))
    return {p.relative_to(REPO) for p in seen}


def covered(module: Path, deps: list[str]) -> bool:
    return any(module == Path(d) or Path(d) in module.parents for d in deps)


def stage_deps(dvcfile: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvcfile.read_text())["stages"]
    result = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        wdir = dvcfile.parent / body.get("wdir", ".")
        result[name] = [str((wdir / d).resolve().relative_to(REPO)) for d in body.get("deps", []) if "${" not in d]
    return result


def entry_modules(dvcfile: Path, stage: str) -> tuple[str, ...]:
    if dvcfile.parent.name == "studies":
        return CLI_ENTRY + STUDY_ENTRY
    return CLI_ENTRY + (f"pipeline.stages.{stage}",)


CASES = [(f, s) for f in (REPO / "dvc.yaml", REPO / "studies" / "dvc.yaml") for s in stage_deps(f)]


@pytest.mark.parametrize("dvcfile,stage", CASES, ids=[f"{f.parent.name}:{s}" for f, s in CASES])
def test_stage_deps_cover_the_import_closure(dvcfile, stage):
    deps = stage_deps(dvcfile)[stage]
    needed = closure(entry_modules(dvcfile, stage), shallow=("pipeline.cli",))
    missing = sorted(str(m) for m in needed if not covered(m, deps))
    assert not missing, f"{dvcfile.relative_to(REPO)} stage {stage!r} imports modules not in its deps: {missing}"


def test_closure_follows_function_level_and_package_imports():
    """The checker itself: threat.py reached through attacks, a lazy import inside a function
    (training.loop imports certify.bounds in a function) and package __init__ files."""
    files = {str(p) for p in closure(("pipeline.stages.train",))}
    assert {"pipeline/threat.py", "pipeline/certify/bounds.py", "pipeline/attacks/__init__.py",
            "pipeline/__init__.py", "pipeline/lirpa_compat.py"} <= files
    assert "pipeline/registry.py" not in files
