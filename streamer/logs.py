"""Log set-up of ``streamer serve`` and ``streamer puller``: text lines, or
JSON lines (``--log-format``).

The JSON form is one object per line on stderr, for log shippers::

    {"ts": "2026-05-09T07:35:25.123Z", "level": "INFO", "logger": "streamer",
     "msg": "serving on ...", ...}

``ts`` is the record's time in ISO 8601 UTC, ``msg`` the formatted message;
any field passed with ``extra=`` to the log call is added under its own name
(the four above win over an extra of the same name), as are ``exc`` (the
formatted traceback) and ``stack`` when the record has them. Values JSON
cannot hold are written as their ``str()``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an integer beyond 64 bits
            return json.dumps(entry, default=str, ensure_ascii=False)


class GrpcTeardownFilter(logging.Filter):
    """gRPC logs an error with a traceback when it cannot send a stream's
    final status because the peer's connection went away first (a gateway
    cut off for not reading, which then disconnects): the gateway's loss,
    not a fault of the service. Such a record becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("ExecuteBatchError raised in core by servicer method"):
            record.msg = "a stream's final status could not be sent: its peer had gone (%s)"
            record.args = (message.rsplit(" ", 1)[-1].strip("[]"),)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as ``fmt`` ("text" or "json") lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("grpc._cython.cygrpc").addFilter(GrpcTeardownFilter())
