"""Time to render the audit report of the default run (goal: HTML and PDF together under 10 s)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.report import render_html, render_pdf
from pipeline.stages.report import build_context
from pipeline.workspace import Workspace


def main() -> None:
    ws = Workspace.at(Path(__file__).resolve().parents[1])
    if not (ws.root / "metrics" / "export.json").is_file():
        print("report render: run `make repro` first")
        return
    start = time.perf_counter()
    context = build_context(ws)
    gathered = time.perf_counter()
    html = render_html(ws.templates, context)
    rendered = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        render_pdf(html, Path(tmp) / "report.pdf", "bench", 0)
    done = time.perf_counter()
    print(f"report render: context and plots {gathered - start:.2f}s, HTML {rendered - gathered:.2f}s, "
          f"PDF {done - rendered:.2f}s, total {done - start:.2f}s (goal < 10 s)")


if __name__ == "__main__":
    main()
