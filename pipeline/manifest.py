"""The integrity manifest: SHA-256 of every artifact the evidence speaks of, optionally signed.

Anyone holding the files can re-hash them with `robustgate verify`; an Ed25519
signature binds the manifest to a key the reviewer trusts.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional

from pipeline.errors import UsageError, first_line
from pipeline.io import sha256_bytes, sha256_file

MANIFEST_VERSION = 1
SIGNING_KEY_ENV = "ROBUSTGATE_SIGNING_KEY"
# What a report's manifest must list: without them it vouches for nothing the report speaks of.
REQUIRED_ARTIFACTS = ("models/model.onnx", "models/model.pt", "data/prepared/data.npz",
                      "reports/build/report.html", "reports/build/report.pdf", "reports/build/evidence.json",
                      "params.yaml")


def build_manifest(root: Path, files: dict[str, Path], extra: dict) -> dict:
    return {
        "schema_version": MANIFEST_VERSION,
        "root": "../..",  # the workspace, relative to reports/build/
        "artifacts": {name: sha256_file(path) for name, path in sorted(files.items()) if path.is_file()},
        **extra,
    }


def canonical_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _load_private_key(pem: bytes):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key must be an Ed25519 private key in PEM form")
    return key


def read_signing_key(path: Path, what: str) -> bytes:
    """The PEM bytes of an Ed25519 private key, validated, so a bad key stops a stage before it writes."""
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise UsageError(f"{what} = {str(path)!r}: cannot read the signing key ({error.strerror})") from None
    try:
        _load_private_key(pem)
    except (ValueError, TypeError) as error:  # cryptography: not PEM, encrypted, or another algorithm
        raise UsageError(f"{what} = {str(path)!r}: not an unencrypted Ed25519 private key in PEM form "
                         f"({first_line(error)})") from None
    return pem


def configured_signing_key(root: Path, params) -> Optional[bytes]:
    """The key from ROBUSTGATE_SIGNING_KEY, else `report.signing_key` (inside the workspace), else None."""
    import os

    from pipeline.io import confine

    env = os.environ.get(SIGNING_KEY_ENV)
    if env:
        return read_signing_key(Path(env), SIGNING_KEY_ENV)
    if params.report.signing_key:
        return read_signing_key(confine(params.report.signing_key, root, "report.signing_key"), "report.signing_key")
    return None



def public_key_pem(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return _load_private_key(private_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(manifest_bytes: bytes, private_pem: bytes) -> dict:
    key = _load_private_key(private_pem)
    public = public_key_pem(private_pem)
    return {
        "algorithm": "ed25519",
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
        "public_key_pem": public.decode("ascii"),
        "public_key_sha256": sha256_bytes(public),
    }


def check_signature(manifest_bytes: bytes, signature: dict, trusted_public_pem: Optional[bytes],
                    name: str = "manifest.json") -> list[str]:
    """Problems with the signature; empty when it verifies (against the trusted key when given)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not isinstance(signature, dict) or not isinstance(signature.get("public_key_pem"), str) \
            or not isinstance(signature.get("signature"), str):
        return [f"{name}.sig is not a signature record"]
    embedded = signature["public_key_pem"].encode("ascii")
    problems = []
    if trusted_public_pem is not None and sha256_bytes(trusted_public_pem.strip() + b"\n") != sha256_bytes(
        embedded.strip() + b"\n"
    ):
        problems.append("signature was made with a different key than the trusted public key")
        embedded = trusted_public_pem
    try:
        load_pem_public_key(embedded).verify(base64.b64decode(signature["signature"]), manifest_bytes)
    except (InvalidSignature, ValueError, TypeError):
        problems.append(f"{name} signature does not verify: {name} was changed or signed by another key")
    return problems


def read_json_bytes(raw: bytes, name: str) -> tuple[Optional[object], list[str]]:
    """Parse JSON evidence; a truncated or garbled file is a problem, not a traceback."""
    try:
        return json.loads(raw.decode("utf-8")), []
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, [f"{name}: not valid JSON ({first_line(error)}); the file is truncated or was edited"]


def sign_file(path: Path, private_pem: bytes) -> None:
    """Write `<path>.sig`: an Ed25519 signature of the file's exact bytes."""
    from pipeline.io import write_json

    write_json(path.with_name(path.name + ".sig"), sign(path.read_bytes(), private_pem))


def check_file_signature(path: Path, trusted_public_pem: Optional[bytes], required: bool) -> tuple[list[str], dict]:
    """Problems with `<path>.sig` (missing when `required`, or not verifying); and what was found."""
    signature_path = path.with_name(path.name + ".sig")
    if not signature_path.is_file():
        if required:
            return [f"{path.name}.sig is missing but the evidence was configured to be signed"], {"signed": False}
        if trusted_public_pem is not None:
            return [f"a trusted public key was given but {path.name} is not signed"], {"signed": False}
        return [], {"signed": False}
    signature, problems = read_json_bytes(signature_path.read_bytes(), signature_path.name)
    if problems:
        return problems, {"signed": True}
    problems = check_signature(path.read_bytes(), signature, trusted_public_pem, path.name)
    return problems, {"signed": True, "public_key_sha256": signature.get("public_key_sha256"),
                      "pinned": trusted_public_pem is not None}


def verify_manifest(manifest_path: Path, trusted_public_pem: Optional[bytes] = None,
                    signature_required: bool = False) -> tuple[list[str], int, dict]:
    """Re-hash every artifact listed; returns (problems, files checked, signature info). A manifest
    without the artifacts a report speaks of, or that says it was signed and has no signature, fails."""
    raw = manifest_path.read_bytes()
    manifest, problems = read_json_bytes(raw, manifest_path.name)
    if problems:
        return problems, 0, {"signed": False}
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(artifacts, dict) or not artifacts:
        return [f"{manifest_path.name} lists no artifacts: it vouches for nothing"], 0, {"signed": False}
    root = (manifest_path.parent / str(manifest.get("root", "."))).resolve()
    problems += [f"{name}: not listed in the manifest" for name in REQUIRED_ARTIFACTS if name not in artifacts]
    for name, digest in artifacts.items():
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            problems.append(f"{name}: path escapes the workspace")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA-256 mismatch (manifest {str(digest)[:16]}..., file {sha256_file(path)[:16]}...)")
    required = signature_required or manifest.get("signed") is True
    signature_problems, info = check_file_signature(manifest_path, trusted_public_pem, required)
    return problems + signature_problems, len(artifacts), info
