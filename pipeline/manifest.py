"""The integrity manifest: SHA-256 of every artifact the evidence speaks of, optionally signed.

Anyone holding the files can re-hash them with `robustgate verify`; an Ed25519
signature binds the manifest to a key the reviewer trusts.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional

from pipeline.io import sha256_bytes, sha256_file

MANIFEST_VERSION = 1


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


def check_signature(manifest_bytes: bytes, signature: dict, trusted_public_pem: Optional[bytes]) -> list[str]:
    """Problems with the signature; empty when it verifies (against the trusted key when given)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    embedded = signature["public_key_pem"].encode("ascii")
    problems = []
    if trusted_public_pem is not None and sha256_bytes(trusted_public_pem.strip() + b"\n") != sha256_bytes(
        embedded.strip() + b"\n"
    ):
        problems.append("signature was made with a different key than the trusted public key")
        embedded = trusted_public_pem
    try:
        load_pem_public_key(embedded).verify(base64.b64decode(signature["signature"]), manifest_bytes)
    except (InvalidSignature, ValueError):
        problems.append("manifest signature does not verify: manifest.json was changed or signed by another key")
    return problems


def verify_manifest(manifest_path: Path, trusted_public_pem: Optional[bytes] = None) -> tuple[list[str], int, dict]:
    """Re-hash every artifact listed; returns (problems, files checked, signature info)."""
    raw = manifest_path.read_bytes()
    manifest = json.loads(raw)
    root = (manifest_path.parent / manifest.get("root", ".")).resolve()
    problems = []
    for name, digest in manifest["artifacts"].items():
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            problems.append(f"{name}: path escapes the workspace")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA-256 mismatch (manifest {digest[:16]}..., file {sha256_file(path)[:16]}...)")
    signature_path = manifest_path.with_name(manifest_path.name + ".sig")
    info = {"signed": signature_path.is_file()}
    if signature_path.is_file():
        signature = json.loads(signature_path.read_text(encoding="utf-8"))
        problems += check_signature(raw, signature, trusted_public_pem)
        info["public_key_sha256"] = signature.get("public_key_sha256")
        info["pinned"] = trusted_public_pem is not None
    elif trusted_public_pem is not None:
        problems.append("a trusted public key was given but the manifest is not signed")
    return problems, len(manifest["artifacts"]), info
