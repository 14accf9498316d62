"""How the server logs: to the console, and to ``ONCOLENS_LOG_FILE`` if set; as text or as one JSON
object per line (``ONCOLENS_LOG_FORMAT=json``) for a log collector."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from oncolens.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_config(settings: Settings) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's and OncoLens' loggers under these settings."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    handlers: dict[str, Any] = {
        "console": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    }
    if settings.log_file is not None:
        # WatchedFileHandler reopens the file when logrotate moves it away
        handlers["file"] = {
            "class": "logging.handlers.WatchedFileHandler",
            "formatter": "main",
            "filename": str(settings.log_file),
            "encoding": "utf-8",
        }
    names = list(handlers)
    level = settings.log_level.upper()
    logger = {"handlers": names, "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": handlers,
        "loggers": {name: dict(logger) for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "oncolens")},
    }
