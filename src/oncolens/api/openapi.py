"""The OpenAPI document as it really answers: every error is ``{"detail": "<message>"}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "What is wrong, in words."}},
    "required": ["detail"],
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_UNUSED = ("HTTPValidationError", "ValidationError")


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` references replaced by the definitions themselves
    (a schema embedded by hand in the OpenAPI document cannot point at its own ``#/$defs``)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the error answers the error handlers really give (4XX: Error)."""
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in _UNUSED:
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            content = dict(_ERROR_CONTENT)
            if "text/html" in responses.get("200", {}).get("content", {}):
                content["text/html"] = {"schema": {"type": "string"}}  # the error page of an HTML route
            responses["4XX"] = {
                "description": "The request cannot be served; `detail` says why.",
                "content": content,
            }
    return spec


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
