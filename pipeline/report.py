"""Render the audit report: HTML with Jinja2 (autoescape always on), PDF with WeasyPrint.

The PDF is reproducible: no clock enters it (SOURCE_DATE_EPOCH is pinned to the
evidence), its identifier is derived from the evidence, and it may fetch
nothing but the `data:` URLs embedded in the HTML.
"""
from __future__ import annotations

import os
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pipeline.claims import METHOD_NAMES

PROFILES = {"default": "base.html.j2", "sotif": "sotif.html.j2", "medical": "medical.html.j2"}


def environment(templates: Path) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(templates)),
        autoescape=True,  # every model name, path and params string is untrusted text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["method"] = lambda name: METHOD_NAMES.get(name, name)
    env.filters["pct"] = lambda v: f"{100 * v:.1f}%" if isinstance(v, (int, float)) else str(v)
    env.filters["ci"] = lambda ci: f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if ci else "-"
    env.filters["num"] = lambda v, digits=4: f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)
    return env


def render_html(templates: Path, context: dict, profile: str = "default") -> str:
    return environment(templates).get_template(PROFILES[profile]).render(**context)


def render_pdf(html: str, target: Path, identifier: str, source_date_epoch: int) -> None:
    """Write a PDF that is byte-identical for identical HTML, identifier and date."""
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    data_urls_only = URLFetcher(allowed_protocols={"data"}, fail_on_errors=True)

    previous = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    try:
        HTML(string=html, url_fetcher=data_urls_only).write_pdf(
            str(target), pdf_identifier=identifier.encode("ascii")
        )
    finally:
        if previous is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = previous
