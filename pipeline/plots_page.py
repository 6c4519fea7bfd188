"""`robustgate plots`: every plots/*.json drawn into one self-contained HTML page.

`dvc plots show` renders with vega scripts loaded from a CDN, so offline it shows a blank page.
This page embeds matplotlib PNGs as data URLs and references no URL at all, so it opens from a
laptop on a plane or an air-gapped review machine. `dvc plots diff` remains the way to compare
plots across commits when a network is at hand.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from pipeline.io import write_text
from pipeline.workspace import Workspace

X_KEYS = ("epoch", "epsilon", "radius")
NOT_Y = {"n", "ci_low", "ci_high", "seconds"}


def columns(rows: list[dict]) -> tuple[str, list[str]] | None:
    """The x column and the numeric y columns of a DVC plot file (a list of flat records)."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    x = next((k for k in X_KEYS if k in rows[0]), None)
    if x is None:
        return None
    ys = [k for k, v in rows[0].items()
          if k != x and k not in NOT_Y and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (x, ys) if ys else None


def figure(rows: list[dict], x: str, ys: list[str], title: str) -> str:
    import matplotlib.pyplot as plt

    from pipeline.plots import _data_url  # one PNG encoder for the report and this page

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs = [r[x] for r in rows]
    for y in ys:
        ax.plot(xs, [r.get(y) for r in rows], marker="o" if len(rows) < 30 else None, label=y)
    if "ci_low" in rows[0] and "ci_high" in rows[0]:
        ax.fill_between(xs, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], alpha=0.2, label="95% CI")
    ax.set(xlabel=x, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _data_url(fig)


def render(files: dict[str, list[dict]]) -> str:
    sections = []
    for name, rows in files.items():
        shape = columns(rows)
        if shape is None:
            continue
        x, ys = shape
        sections.append(f"<h2>{html.escape(name)}</h2>\n<img alt=\"{html.escape(name)}\" "
                        f"src=\"{figure(rows, x, ys, name)}\">")
    body = "\n".join(sections) or "<p>No plots yet: run <code>dvc repro</code> first.</p>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>robustgate plots</title>"
            "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}img{max-width:100%}</style>"
            f"</head><body><h1>robustgate plots</h1>\n{body}\n</body></html>\n")


def plots(ws: Workspace, out: str = "reports/build/plots.html") -> int:
    from pipeline.io import confine

    target = confine(out, ws.root, "--out")
    folder = ws.root / "plots"
    files = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        files[str(Path("plots") / path.name)] = json.loads(path.read_text(encoding="utf-8"))
    write_text(target, render(files))
    print(f"plots: {len(files)} plot file(s) drawn into {target.relative_to(ws.root)} (self-contained, offline)")
    return 0
