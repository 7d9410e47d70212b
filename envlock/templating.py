"""Render the Jinja2 templates in templates/ (shipped inside the wheel as envlock/templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

_PACKAGE = Path(__file__).resolve().parent


def templates_dir() -> Path:
    for candidate in (_PACKAGE / "templates", _PACKAGE.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("envlock's templates/ folder is missing from this installation")


def render(name: str, **context: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env.get_template(name).render(**context)
