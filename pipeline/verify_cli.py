"""`robustgate verify DIR`: re-hash every artifact in the manifest, check its signature, and check
the gate's verdict (`metrics/gate.json`): its signature, and that the hashes it pinned are the
files' and the manifest's. A signature is required when the evidence says it was signed, or the
workspace's params.yaml configures a signing key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipeline.errors import IntegrityMismatch, UsageError
from pipeline.io import sha256_file
from pipeline.manifest import check_file_signature, read_json_bytes, verify_manifest
from pipeline.verdict import read_record


def find_manifest(directory: Path) -> Path:
    for candidate in (directory / "manifest.json", directory / "reports" / "build" / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no manifest.json in {directory} or {directory / 'reports' / 'build'}: run `robustgate report`")


def trusted_key(public_key: Optional[Path]) -> Optional[bytes]:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key_path = public_key or (Path(os.environ["ROBUSTGATE_VERIFY_KEY"]) if os.environ.get("ROBUSTGATE_VERIFY_KEY") else None)
    if key_path is None:
        return None
    if not key_path.is_file():
        raise UsageError(f"public key {key_path} does not exist")
    pem = key_path.read_bytes()
    try:
        load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise UsageError(f"public key {key_path} is not a PEM public key") from None
    return pem


def workspace_root(manifest: Path) -> Path:
    parsed, problems = read_json_bytes(manifest.read_bytes(), manifest.name)
    relative = parsed.get("root", ".") if not problems and isinstance(parsed, dict) else "../.."
    return (manifest.parent / str(relative)).resolve()


def signing_configured(root: Path) -> bool:
    """params.yaml in the workspace names report.signing_key: everything must then be signed."""
    from pipeline.config import read_yaml

    params = root / "params.yaml"
    if not params.is_file():
        return False
    try:
        raw = read_yaml(params)
    except UsageError:
        return False  # the manifest check reports a changed params.yaml
    report = raw.get("report") if isinstance(raw, dict) else None
    return isinstance(report, dict) and bool(report.get("signing_key"))


def gate_problems(root: Path, manifest: Path, trusted: Optional[bytes], required: bool) -> tuple[list[str], str]:
    """The verdict's signature, and its pinned hashes against the files and the manifest."""
    gate = root / "metrics" / "gate.json"
    if not gate.is_file():
        return [], "no gate verdict (metrics/gate.json) beside this manifest"
    record, problems = read_record(gate)
    if record is None:
        return [f"metrics/{problem}" for problem in problems], ""
    pinned = record["artifacts"]
    listed, _ = read_json_bytes(manifest.read_bytes(), manifest.name)
    listed = listed.get("artifacts", {}) if isinstance(listed, dict) else {}
    for name, digest in sorted(pinned.items()):
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            problems.append(f"{name}: pinned by metrics/gate.json but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA-256 differs from the hash metrics/gate.json pinned")
        elif name in listed and listed[name] != digest:
            problems.append(f"{name}: metrics/gate.json and the manifest pin different hashes")
    needed = required or record.get("signed") is True
    # an unsigned verdict from an unsigned run is reported, not refused: the manifest carries the trust
    checked_against = trusted if needed or gate.with_name("gate.json.sig").is_file() else None
    signature, info = check_file_signature(gate, checked_against, needed)
    state = "signed" if info["signed"] else "not signed"
    return problems + signature, f"gate verdict {'PASSED' if record['passed'] else 'FAILED'} ({state})"


def registry_problems(root: Path, manifest: Path, uri: str) -> tuple[list[str], str]:
    """The registry must serve, for every version registered with the report's ONNX hash, exactly
    those bytes; and at least one such version must exist."""
    from pipeline.config import read_yaml
    from pipeline.registry import check_reachable, redact, registered_onnx_sha256, registry_errors, versions

    listed, _ = read_json_bytes(manifest.read_bytes(), manifest.name)
    digest = (listed.get("artifacts") or {}).get("models/model.onnx") if isinstance(listed, dict) else None
    params = read_yaml(root / "params.yaml") if (root / "params.yaml").is_file() else {}
    section = params.get("register") if isinstance(params, dict) else None
    name = section.get("model_name", "robustgate-model") if isinstance(section, dict) else "robustgate-model"
    check_reachable(uri)
    with registry_errors(uri, "comparing the registered model"):
        matching = [row["version"] for row in versions(uri, name) if row["onnx_sha256"] == digest]
        served = {version: registered_onnx_sha256(uri, name, version) for version in matching}
    if not matching:
        return [f"no version of {name!r} in {redact(uri)} was registered with this report's model.onnx"], ""
    problems = [f"registry version {version} of {name!r} serves an ONNX file with SHA-256 {got[:16]}..., "
                f"the report's is {str(digest)[:16]}..." for version, got in served.items() if got != digest]
    return problems, f"registry: version(s) {', '.join(matching)} of {name!r} serve this model.onnx byte for byte"


def check(directory: Path, public_key: Optional[Path] = None, registry: Optional[str] = None
          ) -> tuple[list[str], list[str], int, Path]:
    """Every check `verify` makes, without printing: (problems, what was checked, files checked, manifest)."""
    manifest = find_manifest(directory)
    trusted = trusted_key(public_key)
    root = workspace_root(manifest)
    required = signing_configured(root)
    problems, checked, signature = verify_manifest(manifest, trusted, required)
    gate, gate_state = gate_problems(root, manifest, trusted, required)
    problems += gate
    states = []
    if signature.get("public_key_sha256"):
        state = "pinned to the trusted key" if signature.get("pinned") else "NOT pinned: pass --public-key to trust a key"
        states.append(f"signature by key {signature['public_key_sha256'][:16]}... ({state})")
    elif not signature["signed"]:
        states.append("manifest is not signed")
    states.append(gate_state)
    if registry:
        found, registry_state = registry_problems(root, manifest, registry)
        problems += found
        states.append(registry_state)
    return problems, [state for state in states if state], checked, manifest


def print_findings(command: str, states: list[str], problems: list[str]) -> None:
    """What was checked, then every mismatch, one line each (verify and audit print alike)."""
    for state in states:
        print(f"{command}: {state}")
    for problem in problems:
        print(f"{command}: MISMATCH {problem}")


def verify(directory: Path, public_key: Optional[Path] = None, registry: Optional[str] = None) -> int:
    problems, states, checked, manifest = check(directory, public_key, registry)
    print_findings("verify", states, problems)
    if problems:
        raise IntegrityMismatch(f"{len(problems)} problem(s) in {manifest}")
    print(f"verify: OK, {checked} artifacts match {manifest}")
    return 0
