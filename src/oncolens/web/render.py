"""Rendering a page: the templates, with the CSRF token and the disclaimer every page carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from oncolens.decision import DISCLAIMER
from oncolens.web.session import csrf_token, remember_csrf

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def interval(value: float | None, bounds: list[float | None] | tuple[float | None, ...] | None) -> str:
    """A 95% interval as a page shows it; one that does not contain its point estimate says so (a
    bootstrap interval of a calibration error lies above the error itself: each resample adds noise)."""
    if value is None or not bounds or bounds[0] is None or bounds[1] is None:
        return "n/a"
    low, high = float(bounds[0]), float(bounds[1])
    text = f"{low:.3f} \u2013 {high:.3f}"
    if not low - 1e-9 <= value <= high + 1e-9:
        text += " (the bootstrap resamples' own spread: it lies " + ("above" if low > value else "below")
        text += " the value, because resampling adds error of its own)"
    return text


def rebuild_command(command: str | None, model_id: str) -> str:
    """The card's training command as a reader can run it from a clone: the developer's run and output
    folders are left out (the command's defaults apply) or moved under ``zoo-rebuilt/``."""
    words = (command or "").split()
    out: list[str] = []
    skip = False
    for index, word in enumerate(words):
        if skip:
            skip = False
            continue
        if word == "--run-dir":
            skip = True
            continue
        if word == "--out" and index + 1 < len(words):
            out += ["--out", f"zoo-rebuilt/{model_id}"]
            skip = True
            continue
        out.append(word)
    return " ".join(out)


templates.env.globals |= {"interval": interval, "rebuild_command": rebuild_command}


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context |= {"csrf": csrf_token(request), "disclaimer": DISCLAIMER}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    remember_csrf(request, response)
    return response


def sentence(text: str) -> str:
    """A message as a page shows it: a capital first letter and a full stop."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")
