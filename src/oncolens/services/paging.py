"""Keyset (cursor) pagination: a page after a cursor costs the same on page 1 and page 20,000, and a
row inserted meanwhile neither repeats nor hides an older one (OFFSET does both).

A cursor is the sort key of the last row a client saw, as URL-safe base64 of JSON tagged with its
list; it is not a secret (it holds a time and an id the client was shown) and is checked when read.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from oncolens.errors import InvalidInput

CURSOR_MAX = 200  # characters; the API refuses longer ones before decoding


def encode_cursor(kind: str, *key: Any) -> str:
    text = json.dumps([kind, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")


def not_a_cursor(kind: str) -> InvalidInput:
    return InvalidInput(f"cursor: not a cursor of the {kind} list (pass the next_cursor of a previous page)")


def decode_cursor(kind: str, cursor: str, arity: int) -> list[Any]:
    """The key of a cursor this list gave, or InvalidInput saying it is not one."""
    problem = not_a_cursor(kind)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise problem from None
    if not isinstance(value, list) or len(value) != arity + 1 or value[0] != kind:
        raise problem
    return value[1:]


def decode_event_cursor(cursor: str) -> int:
    """The audit event id an audit-log cursor holds, or InvalidInput saying it is not one."""
    (event_id,) = decode_cursor("audit", cursor, 1)
    if not isinstance(event_id, int) or isinstance(event_id, bool):
        raise not_a_cursor("audit")
    return event_id
