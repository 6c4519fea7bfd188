"""Render the audit report from a context dict with Jinja2 (autoescape always on)."""
from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined


def environment(templates: Path) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(templates)),
        autoescape=True,  # every model name, path and params string is untrusted text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: f"{100 * v:.1f}%" if isinstance(v, (int, float)) else str(v)
    env.filters["ci"] = lambda ci: f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if ci else "-"
    env.filters["num"] = lambda v, digits=4: f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)
    return env


def render_html(templates: Path, context: dict, template: str = "report.html.j2") -> str:
    return environment(templates).get_template(template).render(**context)
