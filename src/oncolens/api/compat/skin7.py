"""The 7-class skin app (FastAPI + Jinja2 pages): upload, then classify, as its web form did.

Its flow is two form posts: ``POST /upload-image`` (multipart ``file``) stores the image and shows
it; ``POST /predict`` (form field ``image_path``, the path the upload returned) classifies it and
shows the top class, its calibrated confidence ("87.65%") and every class's probability, labelled
AKIEC ... VASC as the app did. Browsers get an HTML page; a client that asks for JSON
(``Accept: application/json``) gets the same fields as JSON. ``POST /predict`` also takes the file
directly. ``GET /model-info`` leads to the model's card. Served by ``skin-ham10000``, the same
seven HAM10000 classes, so the mapping is one to one.
"""

from __future__ import annotations

import html
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from oncolens.api.compat.common import APP_ERRORS, Analysis, analyse, app_error, model_for, uploaded_files
from oncolens.config import Settings
from oncolens.errors import NotFound
from oncolens.http.deps import PredictAccess
from oncolens.http.errors import BadRequest
from oncolens.store.images import EXTENSIONS, MEDIA_TYPES
from oncolens.vision.decode import decode_image
from oncolens.vision.prepare import RawImage

APP = "skin7"
router = APIRouter(tags=["compat: skin 7-class app"])

CODES = {c: c.upper() for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
FULL_NAMES = {
    "akiec": "Actinic Keratoses and Intraepithelial Carcinoma (AKIEC)",
    "bcc": "Basal Cell Carcinoma (BCC)",
    "bkl": "Benign Keratosis-like Lesions (BKL)",
    "df": "Dermatofibroma (DF)",
    "mel": "Melanoma (MEL)",
    "nv": "Melanocytic Nevi (NV)",
    "vasc": "Vascular Lesions (VASC)",
}
# Stored under a name the server chooses: a random id and the extension of the format sniffed from
# the bytes. The client's file name never reaches the disk or the Content-Type.
STORED = re.compile(r"^[0-9a-f]{32}\.(?:" + "|".join(ext[1:] for ext in EXTENSIONS.values()) + r")$")
# Browsers get HTML pages, clients asking for JSON get JSON (errors likewise).
PAGE_OR_JSON = {"text/html": {"schema": {"type": "string"}}, "application/json": {"schema": {"type": "object"}}}
MEDIA_BY_EXTENSION = {ext: MEDIA_TYPES[kind] for kind, ext in EXTENSIONS.items()}


def _uploads(request: Request) -> Path:
    settings: Settings = request.app.state.settings
    folder = settings.data_dir / "compat-uploads"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _make_room(folder: Path, incoming: int, settings: Settings) -> None:
    """Expire old uploads, then drop the oldest until the new one fits the store's quota."""
    sweep_uploads(settings.data_dir, settings.compat_upload_keep_minutes)
    kept = []
    for path in folder.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # removed by a parallel request
        if not STORED.match(path.name):
            path.unlink(missing_ok=True)  # an upload of an older version, named by the client
        else:
            kept.append((stat.st_mtime, stat.st_size, path))
    kept.sort()
    files, size = len(kept), sum(s for _, s, _ in kept)
    for _, file_size, path in kept:
        if files + 1 <= settings.compat_upload_max_files and size + incoming <= settings.compat_upload_max_bytes:
            break
        path.unlink(missing_ok=True)
        files, size = files - 1, size - file_size


def sweep_uploads(data_dir: Path, keep_minutes: float) -> int:
    """Remove expired uploads of the skin 7-class app (the server's periodic sweep); returns how many."""
    folder = data_dir / "compat-uploads"
    if not folder.is_dir():
        return 0
    cutoff = time.time() - keep_minutes * 60
    removed = 0
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body><main><h1>{html.escape(title)}</h1>{body}<p><small>Decision support only, not a diagnosis. "
        "A qualified clinician must interpret this result.</small></p></main></body></html>",
        status_code=status,
    )


def _error(request: Request, exc: Exception) -> Response:
    status, message = app_error(exc)
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status)
    return _page("Could not analyse the image", f"<p role='alert'>{html.escape(message)}</p>", status)


def _stored_path(request: Request, image_path: str) -> Path:
    name = image_path.rsplit("/", 1)[-1]
    path = _uploads(request) / name
    if not STORED.match(name) or not path.is_file():
        raise NotFound(f"no uploaded image at {image_path!r}: upload it first with POST /upload-image")
    return path


def _result(analysis: Analysis) -> dict[str, Any]:
    agg = analysis.result.aggregate
    top = agg.top_class
    return {
        "label": FULL_NAMES.get(top, agg.top_class_name),
        "confidence": f"{agg.confidence * 100:.2f}%",
        "predictions": [{"label": CODES.get(c, c), "confidence": p} for c, p in agg.probabilities.items()],
    }


def _page_route(path: str, summary: str, answer: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A POST that answers browsers with a page and JSON clients with JSON, documented as both."""
    return router.post(
        path,
        summary=summary,
        dependencies=[PredictAccess],
        response_class=Response,
        responses={200: {"content": PAGE_OR_JSON, "description": answer}},
    )


@_page_route(
    "/upload-image", "Skin 7-class app: upload an image to classify", "The upload page, or its image_path as JSON."
)
async def upload_image(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    try:
        raw, _ = await uploaded_files(request, ("file",))
        if len(raw) > 1:
            raise BadRequest("send one image in form field 'file'")
        decoded = decode_image(raw[0].data, settings.max_image_bytes, settings.max_image_pixels)
    except APP_ERRORS as exc:
        return _error(request, exc)
    folder = _uploads(request)
    _make_room(folder, len(raw[0].data), settings)
    name = uuid.uuid4().hex + EXTENSIONS[decoded.format]
    with os.fdopen(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(raw[0].data)
    image_path = f"/uploads/{name}"
    if _wants_json(request):
        return JSONResponse({"image_path": image_path})
    base = str(request.url.path).rsplit("/upload-image", 1)[0]
    # At the root, /predict belongs to the app ONCOLENS_COMPAT_ROOT names: post to this app's own.
    action = base + "/predict" if base or settings.compat_root == APP else f"/compat/{APP}/predict"
    src = html.escape(base + image_path)
    return _page(
        "Skin lesion image uploaded",
        f"<img src='{src}' alt='uploaded image' style='max-width:320px'>"
        f"<form method='post' action='{html.escape(action)}'>"
        f"<input type='hidden' name='image_path' value='{html.escape(image_path)}'>"
        "<button type='submit'>Classify</button></form>",
    )


@router.get(
    "/uploads/{name}",
    summary="Skin 7-class app: an uploaded image",
    dependencies=[PredictAccess],
    response_class=FileResponse,
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "The image as uploaded."}},
)
def uploaded(request: Request, name: str) -> FileResponse:
    path = _stored_path(request, name)
    return FileResponse(
        path,
        media_type=MEDIA_BY_EXTENSION[path.suffix],
        headers={"Cache-Control": "private, no-store", "Content-Disposition": "inline"},
    )


@_page_route("/predict", "Skin 7-class app: classify an uploaded image", "The result page, or the result as JSON.")
async def predict(request: Request) -> Response:
    try:
        model = model_for(request, APP)
        content_type = request.headers.get("content-type", "")
        settings: Settings = request.app.state.settings
        form = (
            await request.form(max_files=1, max_part_size=settings.max_image_bytes) if "form" in content_type else None
        )
        image_path = form.get("image_path") if form is not None else None
        if isinstance(image_path, str) and image_path:
            path = _stored_path(request, image_path)
            raw = [RawImage(path.read_bytes(), None)]
        elif form is not None and not isinstance(form.get("file"), str | None):
            upload = form["file"]
            raw = [RawImage(await upload.read(settings.max_image_bytes + 1), upload.filename)]  # type: ignore[union-attr]
        else:
            raise BadRequest("send form field 'image_path' (from POST /upload-image) or an image in field 'file'")
        analysis = await analyse(request, model, raw)
    except APP_ERRORS as exc:
        return _error(request, exc)
    result = _result(analysis)
    if _wants_json(request):
        return JSONResponse(result | {"image_path": image_path or None, "oncolens": analysis.oncolens()})
    rows = "".join(
        f"<tr><td>{html.escape(p['label'])}</td><td>{p['confidence'] * 100:.2f}%</td></tr>"
        for p in sorted(result["predictions"], key=lambda p: -p["confidence"])
    )
    agg = analysis.result.aggregate
    return _page(
        "Skin lesion classification",
        f"<p><strong>{html.escape(result['label'])}</strong>: {result['confidence']}</p>"
        f"<p>Risk level: {html.escape(agg.risk_level)}. {html.escape(agg.recommendation)}</p>"
        f"<table><thead><tr><th>Class</th><th>Probability</th></tr></thead><tbody>{rows}</tbody></table>",
    )


@router.get("/model-info", summary="Skin 7-class app: the model's technical details")
def model_info(request: Request) -> RedirectResponse:
    model = model_for(request, APP)
    return RedirectResponse(f"/api/v1/models/{model.id}", status_code=307)
