"""The user's files that shape the evidence: data under `data.path`, the module of a
`module:callable` model, the release policy.

Two consumers: the manifest and the gate hash them (`pipeline.evidence.artifact_paths`), so
`robustgate verify` fails when one byte of them changes; and DVC tracks them as deps through the
`inputs` section of params.yaml (dvc.yaml templates `${inputs.data}` and `${inputs.model}`,
since DVC cannot template a null `data.path`). `check_dvc_inputs` keeps that section honest: it
must name data.path (or the built-in loader) and the model's module file (or the built-in models),
the supplied file for an onnx/torchscript source, and for a state_dict source a folder holding
both the weights and the factory's module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.errors import UsageError

BUILTIN_DATA_SOURCE = "pipeline/data/datasets.py"
BUILTIN_MODEL_SOURCE = "pipeline/models.py"
BUILTIN_PROPERTIES_SOURCE = "pipeline/stages/properties.py"
PREPARED = "data/prepared"


def model_module_file(model_name: str, root: Path) -> Optional[Path]:
    """The file of a `module:callable` factory's module in the workspace (module.py or
    module/__init__.py), found without importing it; None for built-in or installed models."""
    if ":" not in model_name:
        return None
    base = root.joinpath(*model_name.split(":", 1)[0].split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and candidate.resolve().is_relative_to(root.resolve()):
            return candidate
    return None


def data_files(data_path: Optional[str], root: Path) -> list[Path]:
    """Every regular file at or below data.path (all of them: DVC hashes a directory dep whole)."""
    if not data_path:
        return []
    path = root / data_path
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return []


def user_inputs(params, root: Path) -> dict[str, Path]:
    """The user's input files by workspace-relative path (for the manifest and the gate)."""
    files = data_files(params.data.path, root)
    module = model_module_file(params.model.name, root)
    if module is not None:
        files.append(module)
    if params.model.supplied:
        files.append(root / params.model.path)
    files.extend(instance_files(params.properties.instances, root))
    files.append(root / params.gate.policy)
    return {p.resolve().relative_to(root.resolve()).as_posix(): p for p in files if p.is_file()}


def instance_files(instances: Optional[str], root: Path) -> list[Path]:
    """properties.instances and the ONNX and VNNLIB files it lists (paths relative to the CSV), those
    inside the workspace. DVC cannot template deps from a CSV's rows, so it tracks the folder
    `inputs.properties` that must hold them all (the properties stage refuses a listed file outside
    it); the manifest and the gate hash each file here, so `robustgate verify` fails when one
    changed after the report."""
    import csv

    if not instances:
        return []
    table = root / instances
    if not table.is_file() or not table.resolve().is_relative_to(root.resolve()):
        return []
    files = [table]
    with table.open(newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.reader(handle):
            for name in row[:2]:
                listed = (table.parent / name.strip()).resolve()
                if name.strip() and listed.is_file() and listed.is_relative_to(root.resolve()):
                    files.append(listed)
    return files


def _same_or_inside(given: str, expected: Path, root: Path) -> bool:
    given_path = (root / given).resolve()
    target = expected.resolve()
    return target == given_path or given_path in target.parents


def check_dvc_inputs(params, root: Path, source: str = "params.yaml") -> None:
    """Refuse an `inputs` section that does not name the files data.path and model.name use,
    so DVC cannot miss a changed data file or model module. Absent section: nothing to check."""
    if params.inputs is None:
        return
    data_expected = params.data.path or BUILTIN_DATA_SOURCE
    if _same_or_inside(params.inputs.data, root / PREPARED, root):
        raise UsageError(f"{source}: inputs.data = {params.inputs.data!r} contains {PREPARED!r}, prepare's own output; "
                         "keep your data in a folder of its own, e.g. data/raw/")
    if not _same_or_inside(params.inputs.data, root / data_expected, root):
        raise UsageError(f"{source}: inputs.data = {params.inputs.data!r} must be {data_expected!r} "
                         f"(data.dataset {params.data.dataset!r}) so that DVC re-runs prepare when the data changes")
    module = model_module_file(params.model.name, root)
    model_expected = module.relative_to(root).as_posix() if module is not None else BUILTIN_MODEL_SOURCE
    _check_properties_inputs(params, root, source)
    if params.model.source == "state_dict":  # the weights and the factory's code: one folder holding both
        _check_state_dict_inputs(params, module, root, source)
        return
    if params.model.supplied:  # the supplied file is what train (importing it) depends on
        model_expected = params.model.path
    if not _same_or_inside(params.inputs.model, root / model_expected, root):
        raise UsageError(f"{source}: inputs.model = {params.inputs.model!r} must be {model_expected!r} "
                         f"(model.name {params.model.name!r}) so that DVC re-runs train when the model code changes")


def _check_properties_inputs(params, root: Path, source: str) -> None:
    """properties.instances and the files it lists are one DVC dep, `inputs.properties`: a folder that
    must hold the CSV (the stage refuses a listed file outside it), so editing any re-runs properties."""
    instances = params.properties.instances
    if instances and not _same_or_inside(params.inputs.properties, root / instances, root):
        raise UsageError(f"{source}: inputs.properties = {params.inputs.properties!r} must be the folder holding "
                         f"properties.instances = {instances!r} and the files it lists, so that DVC re-runs "
                         "properties when one of them changes")


def properties_folder(params, root: Path) -> Path:
    """Where every file properties.instances lists must lie: the DVC-tracked `inputs.properties`
    folder, or the workspace when params have no inputs section (a stage run outside DVC)."""
    if params.inputs is None:
        return root
    return root / params.inputs.properties


def _check_state_dict_inputs(params, module: Optional[Path], root: Path, source: str) -> None:
    """A state_dict model depends on two user files, the weights (model.path) and the factory's module;
    dvc.yaml templates one `${inputs.model}` dep, so it must be a folder that holds both (DVC hashes
    a folder dep whole: one changed byte of either re-runs every stage that builds the model)."""
    needed = [params.model.path] + ([module.relative_to(root).as_posix()] if module is not None else [])
    missing = [n for n in needed if not _same_or_inside(params.inputs.model, root / n, root)]
    if missing:
        raise UsageError(f"{source}: inputs.model = {params.inputs.model!r} must be a folder holding "
                         f"{' and '.join(repr(n) for n in needed)} (the weights and the factory of model.name "
                         f"{params.model.name!r}) so that DVC re-runs train when either changes")
