"""Where every stage reads and writes, relative to the workspace root."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params, load_params


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
    def checkpoint(self) -> Path:
        """The weights every piece of evidence is bound to by SHA-256."""
        return self.root / "models" / "model.pt"

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

    def pipeline_outputs(self) -> set[str]:
        """Files the pipeline itself writes (dvc.lock and every stage's outs, metrics and plots): a
        change there is the run's own record, not a change of the source that produced it."""
        import yaml

        outputs = {"dvc.lock"}
        for dvc_file in (self.root / "dvc.yaml", self.root / "studies" / "dvc.yaml"):
            if not dvc_file.is_file():
                continue
            stages = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {})
            base = dvc_file.parent.relative_to(self.root)
            for stage in stages.values():
                body = stage.get("do", stage)  # a foreach stage keeps its body under `do`
                wdir = base / body.get("wdir", ".")
                for kind in ("outs", "metrics", "plots"):
                    for entry in body.get(kind, []) or []:
                        name = next(iter(entry)) if isinstance(entry, dict) else entry
                        name = os.path.dirname(name) if "${" in name else name  # a foreach item's folder
                        outputs.add(os.path.normpath(str(wdir / name)))
        return outputs

    def source_changes(self) -> list[str]:
        """Tracked or untracked (not ignored) files that differ from HEAD, less the pipeline's outputs."""
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=self.root,
                                capture_output=True, text=True, check=True).stdout
        outputs = self.pipeline_outputs()
        changed = []
        for line in status.splitlines():
            name = line[3:].split(" -> ")[-1].strip('"')
            if not any(name == out or name.startswith(out.rstrip("/") + "/") for out in outputs):
                changed.append(name)
        return changed

    def git_commit(self) -> str:
        """HEAD of the workspace's git repository, `+dirty` when its source differs from HEAD
        (files the pipeline writes itself, such as dvc.lock and metrics, do not count)."""
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = self.source_changes()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
        return head + ("+dirty" if dirty else "")
