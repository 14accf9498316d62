"""Rendering a page: the templates, with the CSRF token and the disclaimer every page carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from oncolens.analysis import DISCLAIMER
from oncolens.web.session import csrf_token, remember_csrf

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context |= {"csrf": csrf_token(request), "disclaimer": DISCLAIMER}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    remember_csrf(request, response)
    return response


def sentence(text: str) -> str:
    """A message as a page shows it: a capital first letter and a full stop."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")
