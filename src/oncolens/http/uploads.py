"""Reading images from a request: multipart ``file``/``files`` or a JSON body with base64."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from oncolens.config import Settings
from oncolens.http.deps import ModelDep, SettingsDep
from oncolens.http.errors import BadRequest
from oncolens.http.middleware import BodyTooLarge
from oncolens.services.analysis import prepare_off_loop
from oncolens.vision.decode import ImageDecodeError, decode_base64
from oncolens.vision.prepare import PreparedImages, RawImage, name_image


class ImageIn(BaseModel):
    image: str = Field(description="Base64 image bytes, optionally as a data URI (data:image/png;base64,...).")
    filename: str | None = Field(None, description="The original file name, kept only as a label.")


class PredictJSON(BaseModel):
    """JSON alternative to multipart: one ``image`` or a list of ``images``."""

    image: str | None = Field(None, description="Base64 image bytes, optionally as a data URI.")
    filename: str | None = None
    images: list[ImageIn] | None = Field(None, description="Several images of one case.")

    model_config = {
        "json_schema_extra": {
            "examples": [{"image": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ...", "filename": "lesion.jpg"}]
        }
    }


HOW_TO_SEND = (
    "send the image as multipart form field 'file' (or several 'files'), "
    'or as JSON {"image": "<base64 or data URI>", "filename": "..."}'
)


async def raw_images(uploads: Sequence[UploadFile], settings: Settings) -> list[RawImage]:
    """The bytes of uploaded files, each read up to one byte past the per-image limit (so an
    oversized file is refused by the decoder with its size, without reading all of it)."""
    return [RawImage(await upload.read(settings.max_image_bytes + 1), upload.filename) for upload in uploads]


async def read_form(
    request: Request, settings: Settings, fields: tuple[str, ...] = ("file", "files"), required: bool = True
) -> tuple[list[RawImage], dict[str, str]]:
    """The one multipart reader (API, compat routes, web form): the files under ``fields`` and the
    text fields beside them. A body that is not multipart is a 415; one with no file (when
    ``required``) a 400."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise BadRequest(
            f"send multipart/form-data with the image in field {fields[0]!r} (got {content_type or 'no content type'})",
            status=415,
        )
    try:
        form = await request.form(max_files=settings.max_images_per_request, max_part_size=settings.max_image_bytes)
    except BodyTooLarge:
        raise
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException here
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise BadRequest(f"too many images; at most {settings.max_images_per_request} per request", 413) from exc
        raise BadRequest(f"the multipart body could not be read: {detail}") from exc
    uploads: list[UploadFile] = []
    text: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            text[key] = value
        elif key in fields and value.filename != "":  # a browser sends an empty part for "no file chosen"
            uploads.append(value)
    if not uploads and required:
        hint = " (the field holds text, not a file)" if any(f in text for f in fields) else ""
        raise BadRequest(f"no image in the request: no image file in form field {fields[0]!r}{hint}")
    return await raw_images(uploads, settings), text


async def _from_json(request: Request, settings: Settings) -> list[RawImage]:
    raw = await request.body()  # bounded by the BodySizeLimit middleware (settings.max_body_bytes)
    try:
        body = PredictJSON.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest("the JSON body is nested too deeply") from exc
    except ValidationError as exc:
        raise BadRequest(f"unexpected JSON body: {HOW_TO_SEND}") from exc
    entries = [(body.image, body.filename)] if body.image is not None else []
    entries += [(item.image, item.filename) for item in body.images or []]
    if not entries:
        raise BadRequest(f"no image in the request: {HOW_TO_SEND}")
    images = []
    for index, (text, filename) in enumerate(entries):
        try:
            images.append(RawImage(decode_base64(text, settings.max_image_bytes), filename))
        except ImageDecodeError as exc:
            raise type(exc)(name_image(index, filename, len(entries)) + str(exc)) from exc
    return images


async def read_images(request: Request, settings: SettingsDep) -> list[RawImage]:
    """The request's images as bytes, from multipart ``file``/``files`` or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        images, _ = await read_form(request, settings)
    elif content_type == "application/json":
        images = await _from_json(request, settings)
    else:
        raise BadRequest(f"unsupported content type {content_type or '(none)'!r}: {HOW_TO_SEND}", status=415)
    if len(images) > settings.max_images_per_request:
        raise BadRequest(
            f"{len(images)} images sent; at most {settings.max_images_per_request} per request", status=413
        )
    return images


RawImagesDep = Annotated[list[RawImage], Depends(read_images)]


async def prepare_images(raw: RawImagesDep, model: ModelDep, settings: SettingsDep) -> PreparedImages:
    """Decode and preprocess on a worker thread, keeping the event loop free."""
    return await prepare_off_loop(raw, model, settings)


ImagesDep = Annotated[PreparedImages, Depends(prepare_images)]
