"""Reading images from a request: multipart ``file``/``files`` or a JSON body with base64."""

from __future__ import annotations

import json
import time
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from oncolens.analysis import CaseResult, PreparedImages, RawImage, case_result, name_image, prepare
from oncolens.api.batching import InferenceBatcher
from oncolens.api.deps import ModelDep, SettingsDep
from oncolens.api.errors import BadRequest
from oncolens.api.middleware import BodyTooLarge
from oncolens.api.schemas import PredictJSON
from oncolens.config import Settings
from oncolens.imaging import ImageDecodeError, decode_base64
from oncolens.zoo import ModelPackage

HOW_TO_SEND = (
    "send the image as multipart form field 'file' (or several 'files'), "
    'or as JSON {"image": "<base64 or data URI>", "filename": "..."}'
)


async def _from_multipart(request: Request, settings: Settings) -> list[RawImage]:
    try:
        form = await request.form(max_files=settings.max_images_per_request, max_part_size=settings.max_image_bytes)
    except BodyTooLarge:
        raise
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException here
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise BadRequest(f"too many images; at most {settings.max_images_per_request} per request", 413) from exc
        raise BadRequest(f"the multipart body could not be read: {detail}") from exc
    uploads = [v for k, v in form.multi_items() if k in ("file", "files") and isinstance(v, UploadFile)]
    if not uploads:
        texts = [k for k, v in form.multi_items() if k in ("file", "files")]
        hint = " (the field holds text, not a file)" if texts else ""
        raise BadRequest(f"no image in the request{hint}: {HOW_TO_SEND}")
    images = []
    for upload in uploads:
        data = await upload.read(settings.max_image_bytes + 1)
        images.append(RawImage(data, upload.filename))
    return images


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
        images = await _from_multipart(request, settings)
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
    return await anyio.to_thread.run_sync(prepare, raw, model, settings)


ImagesDep = Annotated[PreparedImages, Depends(prepare_images)]


async def run_case(
    model: ModelPackage, batcher: InferenceBatcher, images: PreparedImages
) -> tuple[CaseResult, np.ndarray]:
    """The one predict path of the API: batched inference, then calibrated per-image and case results."""
    start = time.perf_counter()
    logits, features = await batcher.run(images.inputs)
    inference_ms = (time.perf_counter() - start) * 1000
    result = case_result(
        model,
        logits.astype("float64"),
        [(d.width, d.height) for d in images.decoded],
        images.filenames,
        {"decode": round(images.decode_ms, 2), "inference": round(inference_ms, 2)},
    )
    if batcher.metrics is not None:
        batcher.metrics.record_case(result, inference_ms / 1000)
    return result, features
