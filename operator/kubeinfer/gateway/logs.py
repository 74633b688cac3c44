"""Structured logs: one JSON object per line, with the `extra` fields of the record at the top level.

Log collectors (Loki, Cloud Logging, Elasticsearch) index JSON lines without parsing rules; the
access log's fields (model, replica, status, timings, tokens) become queryable as they are.
"""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str = "json", access_log: bool = True) -> None:
    """Root logging for the gateway process: JSON (default) or plain text lines on stderr."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("kubeinfer.gateway.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request otherwise
