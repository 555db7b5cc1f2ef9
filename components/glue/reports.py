"""Reports the Kubeflow UI renders: Markdown (``dsl.Markdown``) or self-contained HTML (``dsl.HTML``, the contact
sheet inline: the UI shows HTML in a sandboxed frame without external files).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def markdown_report(artifact, title: str, values: dict[str, Any] | None = None, links: dict[str, str] | None = None,
                    notes: list[str] | tuple[str, ...] = ()) -> str:
    """A Markdown report (``dsl.Markdown``): title, a table of values, links, notes."""
    lines = [f"# {title}", ""]
    if values:
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in values.items()]
        lines.append("")
    for name, url in (links or {}).items():
        lines.append(f"- [{name}]({url})")
    if links:
        lines.append("")
    lines += [f"- {n}" for n in notes]
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text("\n".join(lines) + "\n")
    return artifact.path


def html_report(artifact, title: str, values: dict[str, Any], links: dict[str, str] | None = None,
                image: str | os.PathLike | None = None, notes: list[str] | tuple[str, ...] = ()) -> str:
    """A self-contained HTML report (``dsl.HTML``): metrics table, links (e.g. sample MP4s in MLflow), notes and the
    contact sheet inline (the Kubeflow UI shows HTML in a sandboxed frame: no external files)."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in values.items())
    items = "".join(f'<li><a href="{esc(u)}" target="_blank">{esc(n)}</a></li>' for n, u in (links or {}).items())
    items += "".join(f"<li>{esc(n)}</li>" for n in notes)
    img = ""
    if image and Path(image).is_file():
        data = base64.b64encode(Path(image).read_bytes()).decode()
        img = f'<h2>Contact sheet</h2><img alt="contact sheet" src="data:image/png;base64,{data}">'
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif}td{padding:2px 10px;border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{esc(title)}</h1><table>{rows}</table><ul>{items}</ul>{img}</body></html>")
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(page)
    return artifact.path
