"""Structured logs: one JSON object per line, secrets never included.

    log = get_logger("receiver.callbacks")
    log.info("callback.accepted", task_id="tsk_…", verdict="accepted")

Field names that smell of secrets are masked, at any depth, and callback paths
lose their token, so a log line never carries a key, a secret or a full signed
URL.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_SECRET_FIELD = re.compile(r"(secret|token|key|password|authorization|signature)", re.IGNORECASE)
# The token is the credential: its first character whatever it is, then everything up to the next
# `/`, `?`, quote, space or line end (a path like `/callbacks/\r<rest>` must not keep its rest).
# However the path around it is spelt: `/Callbacks/…`, `/callbacks//…`, `/x/callbacks;/…` (a
# proxy or provider that mangles the URL gets a 404 whose log line must not hold the token).
_SIGNED_PATH = re.compile(r"(callbacks|assets)[/;]+[^/?][^/?\"' \n]*", re.IGNORECASE)
_SIGNED_QUERY = re.compile(r"([?&](?:sig|signature|token|fal_webhook)=)[^&\s\"']+", re.IGNORECASE)
# And a token wherever it stands, by its shape (`<payload>.<time>.<43-character signature>`, URL-safe
# base64): under a misspelt prefix (`/callback/…`, `/callbacks./…`, `/callbacks\…`) or none at all.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,16}\.[A-Za-z0-9_-]{40,}")
_TOKEN_LENGTH = 8 + 1 + 4 + 1 + 40  # the shortest text _TOKEN finds


def redact_path(text: str) -> str:
    """Strip callback and asset tokens and signatures from a path or URL."""
    folded = text.lower()
    prefixed = "callbacks" in folded or "assets" in folded
    shaped = len(text) >= _TOKEN_LENGTH and "." in text  # not every log line's event name
    if not prefixed and not shaped and "=" not in text:
        return text
    if prefixed:
        text = _SIGNED_PATH.sub(r"\1/[redacted]", text)
    if shaped:
        text = _TOKEN.sub("[redacted]", text)
    return _SIGNED_QUERY.sub(r"\1[redacted]", text)


def _clean(key: str, value: Any) -> Any:
    """A field's value as logged: masked if its name smells of a secret, else with every string
    in it, however deeply nested in dicts and lists, stripped of tokens (`redact_path`)."""
    if _SECRET_FIELD.search(key) and not key.endswith(("_id", "_count")):
        return "[redacted]"
    if isinstance(value, str):
        return redact_path(value)
    if isinstance(value, dict):
        return {str(inner): _clean(str(inner), item) for inner, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean("", item) for item in value]
    return value


def _text(value: object) -> str:
    """Whatever JSON cannot hold, as redacted text (a URL object, an exception, …)."""
    return redact_path(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact_path(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                line[key] = _clean(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc"] = redact_path(self.formatException(record.exc_info))[-2000:]
        return orjson.dumps(line, default=_text).decode()


class Logger:
    """A thin wrapper: an event name plus keyword fields."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            exc_info = fields.pop("exc_info", None)
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def enabled(self, level: int = logging.INFO) -> bool:
        return self._logger.isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def configure_logging(level: str = "info") -> None:
    """Send every `receiver` and `uvicorn` log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("receiver", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # uvicorn's access log prints raw paths, which would leak callback tokens;
    # the receiver logs its own, redacted, access lines instead.
    logging.getLogger("uvicorn.access").disabled = True
    # Other libraries' warnings (asyncio, httpx, …) would reach Python's last-resort handler and
    # come out as plain text among the JSON lines: they go through the JSON formatter too (unless
    # something, a test runner say, already handles the root logger).
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
    # The multipart parser warns about every malformed form it is given; the client is answered
    # 400 for it, so it is no news for the operator.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
