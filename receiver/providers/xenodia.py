"""xenodia: one image endpoint for every model, in async task mode; results are pulled by polling.

Submit: `POST {base}/v1/images/generations` `{model, prompt, async: true, response_format: "url",
aspect_ratio?, resolution?, output_format?, image_input?, n?, channel_id?}` as JSON, or as
multipart/form-data when the client uploaded reference files (`image`/`image[]` file parts,
`image_input` URLs as repeated fields) -> `202 {"task_id", "object": "task", "state": "waiting",
"poll_url": "/v1/tasks/{id}"}`.

Poll: `GET {base}{poll_url}` -> the task object: `state` waiting | running/processing |
succeeded/completed | failed; a finished task carries `data: [{"url"}]` (or `result.data`), a
failed one `error: {code, message}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload
from receiver.logs import get_logger
from receiver.providers.base import (
    Answer,
    HttpProvider,
    Submission,
    Upload,
    error_object,
    image_list,
    json_object,
    optional_str,
)
from receiver.tasks import Report, Task
from receiver.types import JSON, TaskState

log = get_logger("receiver.providers.xenodia")

PATH = "/v1/images/generations"

_STATES = {
    "waiting": TaskState.SUBMITTED,
    "queued": TaskState.SUBMITTED,
    "pending": TaskState.SUBMITTED,
    "running": TaskState.RUNNING,
    "processing": TaskState.RUNNING,
    "in_progress": TaskState.RUNNING,
    "succeeded": TaskState.SUCCEEDED,
    "completed": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
    "cancelled": TaskState.FAILED,
    "canceled": TaskState.FAILED,
}


class XenodiaTaskDialect:
    """Reads Xenodia's task object, the answer to a poll."""

    name = "xenodia"

    def detect(self, payload: JSON) -> bool:
        return payload.get("object") == "task" and "state" in payload

    def parse(self, payload: JSON) -> Report:
        raw = payload.get("state", payload.get("status"))
        state = _STATES.get(raw.lower()) if isinstance(raw, str) else None
        if state is None:
            # Only a string is shown (shortened): the repr of a deeply nested value would recurse too far.
            got = repr(raw[:40]) if isinstance(raw, str) else f"a {type(raw).__name__}"
            raise InvalidPayload(f"A xenodia task's state is one of: {', '.join(_STATES)}; got {got}.")
        upstream = optional_str(payload, "task_id") or optional_str(payload, "id")
        progress = payload.get("progress")
        share = float(progress) if isinstance(progress, (int, float)) and not isinstance(progress, bool) else None
        if state is TaskState.FAILED:
            error = error_object(payload.get("error"), "generation_failed")
            return Report(state, upstream, error=error, progress=share, dialect=self.name)
        if state is not TaskState.SUCCEEDED:
            return Report(state, upstream, progress=share, dialect=self.name)
        images = image_list(_result_items(payload))
        if not images:
            error = {"code": "empty_result", "message": "The provider reported success without any image."}
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        return Report(state, upstream, images=images, dialect=self.name)


def _result_items(payload: JSON) -> Any:
    if isinstance(payload.get("data"), list):
        return payload["data"]
    result = payload.get("result")
    if isinstance(result, dict):
        return result.get("data", result.get("images", []))
    if isinstance(result, list):
        return result
    return []


class XenodiaProvider(HttpProvider):
    name = "xenodia"
    dialect = "xenodia"

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient, *, timeout: float) -> None:
        super().__init__(settings, client, timeout=timeout)
        self.tasks = XenodiaTaskDialect()

    async def submit(self, task: Task, callback_url: str, uploads: Sequence[Upload] = ()) -> Submission:
        # Xenodia has no callbacks: `callback_url` is not sent, the task is polled instead.
        fields: JSON = {"model": task.model, **task.request, "async": True, "response_format": "url"}
        body: dict[str, Any]
        if uploads:
            body = {
                "data": form_fields(fields),
                "files": [(u.field, (u.filename, u.data, u.content_type)) for u in uploads],
            }
        else:
            body = {"json": fields}
        response = await self.call("POST", self.settings.url + PATH, **body)
        answer = json_object(response, self.name)
        task_id = answer.get("task_id")
        valid = isinstance(task_id, (str, int)) and not isinstance(task_id, bool) and task_id != ""
        upstream = str(task_id) if valid else None
        if isinstance(answer.get("data"), list) and answer["data"]:  # it answered synchronously after all
            report = self.answered_images(answer["data"], upstream, response, answer)
            return Submission(upstream, report=report, raw=answer)
        if not upstream:
            raise self.garbled("xenodia accepted the request but named no task_id.", response, answer)
        return Submission(upstream, poll_url=self._poll_path(answer.get("poll_url"), upstream), raw=answer)

    async def poll(self, poll_url: str) -> tuple[Answer, Report]:
        response = await self.call("GET", self.settings.url + poll_url)
        payload = json_object(response, self.name)
        answer = Answer(response.content, payload, response.headers.get("content-type"))
        return answer, self.tasks.parse(payload)

    def _poll_path(self, value: Any, upstream: str) -> str:
        """The path to poll, relative to the configured base: a poll URL on another host is never
        followed (the API key goes with every poll), the documented task path is used instead."""
        fallback = f"/v1/tasks/{quote(upstream, safe='')}"
        if not isinstance(value, str) or not value:
            return fallback
        path: str = value.removeprefix(self.settings.url)
        if path.startswith("/") and not path.startswith("//") and path.isprintable() and " " not in path:
            return path
        log.warning("xenodia.poll_url_ignored", upstream_task_id=upstream, reason="not a path on the provider's host")
        return fallback


def form_fields(fields: JSON) -> dict[str, str | list[str]]:
    """Multipart text fields: lists repeat the field, booleans are `true`/`false`, objects are JSON."""
    form: dict[str, str | list[str]] = {}
    for name, value in fields.items():
        if value is None:
            continue
        form[name] = [_text(item) for item in value] if isinstance(value, list) else _text(value)
    return form


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)
