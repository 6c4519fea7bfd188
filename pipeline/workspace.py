"""Where every stage reads and writes, relative to the workspace root."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params, load_params

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Workspace:
    root: Path
    params_file: Path

    @classmethod
    def at(cls, root: Path, params_file: str = "params.yaml") -> "Workspace":
        root = root.resolve()
        return cls(root, root / params_file)

    def params(self) -> Params:
        return load_params(self.params_file, self.root)

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared" / "data.npz"

    @property
    def model_dir(self) -> Path:
        return self.root / "models"

    @property
    def onnx(self) -> Path:
        return self.root / "models" / "model.onnx"

    @property
    def train_plot(self) -> Path:
        return self.root / "plots" / "train.json"

    @property
    def adversarial(self) -> Path:
        return self.root / "artifacts" / "attack" / "adversarial.npz"

    @property
    def attack_samples(self) -> Path:
        return self.root / "artifacts" / "attack" / "samples.jsonl"

    @property
    def certify_samples(self) -> Path:
        return self.root / "artifacts" / "certify" / "samples.jsonl"

    @property
    def report_html(self) -> Path:
        return self.root / "reports" / "build" / "report.html"

    @property
    def templates(self) -> Path:
        return self.root / "reports" / "templates"

    def git_commit(self) -> str:
        """HEAD of the workspace's git repository, `+dirty` when tracked files changed."""
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=self.root, capture_output=True, text=True, check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
        return head + ("+dirty" if dirty else "")
