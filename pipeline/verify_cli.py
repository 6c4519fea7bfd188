"""`robustgate verify DIR`: re-hash every artifact in the manifest and check its signature."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipeline.errors import IntegrityMismatch, UsageError
from pipeline.manifest import verify_manifest


def find_manifest(directory: Path) -> Path:
    for candidate in (directory / "manifest.json", directory / "reports" / "build" / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no manifest.json in {directory} or {directory / 'reports' / 'build'}: run `robustgate report`")


def verify(directory: Path, public_key: Optional[Path] = None) -> int:
    manifest = find_manifest(directory)
    key_path = public_key or (Path(os.environ["ROBUSTGATE_VERIFY_KEY"]) if os.environ.get("ROBUSTGATE_VERIFY_KEY") else None)
    if key_path is not None and not key_path.is_file():
        raise UsageError(f"public key {key_path} does not exist")
    trusted = key_path.read_bytes() if key_path is not None else None
    problems, checked, signature = verify_manifest(manifest, trusted)
    for problem in problems:
        print(f"verify: MISMATCH {problem}")
    if signature["signed"]:
        state = "pinned to the trusted key" if signature.get("pinned") else "NOT pinned: pass --public-key to trust a key"
        print(f"verify: signature by key {signature['public_key_sha256'][:16]}... ({state})")
    else:
        print("verify: manifest is not signed")
    if problems:
        raise IntegrityMismatch(f"{len(problems)} problem(s) in {manifest}")
    print(f"verify: OK, {checked} artifacts match {manifest}")
    return 0
