"""Responses the API and the web pages send alike: a stored image and a PDF report, never cached."""

from __future__ import annotations

from fastapi import Response

from oncolens.services.cases import StoredFile

NO_STORE = {"Cache-Control": "private, no-store"}


def file_response(stored: StoredFile) -> Response:
    """A stored image as sent: never kept by shared caches."""
    return Response(stored.content, media_type=stored.media_type, headers=NO_STORE)


def pdf_response(pdf: bytes, case_id: str) -> Response:
    """A case's PDF report as a download named after the case."""
    headers = {"Content-Disposition": f'attachment; filename="oncolens-case-{case_id}.pdf"'} | NO_STORE
    return Response(pdf, media_type="application/pdf", headers=headers)
