"""Callback dialects of providers another service submits to (POST /v1/callback-urls).

    report = KlingDialect().parse(payload)

kie      {"code": 200, "msg", "data": {"taskId", "info": {"resultImageUrl", "originImageUrl"?}}};
         any other code (400, 500, 501, …) is a failure.
kling    {"task_id", "task_status": "submitted|processing|succeed|failed", "task_status_msg",
         "created_at", "updated_at", "task_result": {"images": [{"index", "url"}]}}, on every change.
apimart  {"id", "status": "completed|failed", "progress", "result": {"images": [{"url": ["…"],
         "expires_at"}]}}, posted to `<callback_url>/callback`; `cancelled` ends the task cancelled,
         any other status is progress.

Each `detect` looks for the keys that make its shape its own; `auto` accepts a
payload only when exactly one dialect claims it.
"""

from __future__ import annotations

from typing import Any

from receiver.errors import InvalidPayload
from receiver.providers.base import error_object, optional_str
from receiver.tasks import Report
from receiver.types import JSON, TaskState

_EMPTY = {"code": "empty_result", "message": "The provider reported success without any image."}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class KieDialect:
    name = "kie"

    def detect(self, payload: JSON) -> bool:
        data = payload.get("data")
        return (
            _is_int(payload.get("code"))
            and "msg" in payload
            and (data is None or (isinstance(data, dict) and "taskId" in data))
        )

    def parse(self, payload: JSON) -> Report:
        code = payload.get("code")
        if not _is_int(code):
            raise InvalidPayload("A kie callback has an integer 'code'.")
        data = payload.get("data")
        if data is not None and not isinstance(data, dict):
            raise InvalidPayload("A kie callback's 'data' is an object.")
        upstream = optional_str(data or {}, "taskId")
        msg = payload.get("msg")
        if code != 200:
            error = {
                "code": "generation_failed",
                "message": msg if isinstance(msg, str) and msg else f"kie reported code {code}.",
                "upstream_code": code,
            }
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        info = (data or {}).get("info")
        if not isinstance(info, dict):
            return Report(TaskState.FAILED, upstream, error=_EMPTY, dialect=self.name)
        images = []
        result = info.get("resultImageUrl")
        if isinstance(result, str) and result.strip():
            image = {"url": result}
            if isinstance(info.get("originImageUrl"), str) and info["originImageUrl"]:
                image["origin_url"] = info["originImageUrl"]
            images.append(image)
        urls = info.get("resultUrls")  # kie's other image APIs answer a list
        if isinstance(urls, list):
            images.extend({"url": url} for url in urls if isinstance(url, str) and url.strip())
        if not images:
            return Report(TaskState.FAILED, upstream, error=_EMPTY, dialect=self.name)
        return Report(TaskState.SUCCEEDED, upstream, images=tuple(images), dialect=self.name)


_KLING_STATES = {
    "submitted": TaskState.SUBMITTED,
    "processing": TaskState.RUNNING,
    "succeed": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
}


class KlingDialect:
    name = "kling"

    def detect(self, payload: JSON) -> bool:
        return isinstance(payload.get("task_status"), str) and "task_id" in payload

    def parse(self, payload: JSON) -> Report:
        status = payload.get("task_status")
        state = _KLING_STATES.get(status) if isinstance(status, str) else None
        if state is None:
            raise InvalidPayload(f"A kling callback's task_status is one of: {', '.join(_KLING_STATES)}.")
        upstream = optional_str(payload, "task_id")
        message = payload.get("task_status_msg")
        if state is TaskState.FAILED:
            error = {
                "code": "generation_failed",
                "message": message if isinstance(message, str) and message else "kling reported a failure.",
            }
            return Report(state, upstream, error=error, dialect=self.name)
        if state is not TaskState.SUCCEEDED:
            return Report(state, upstream, dialect=self.name)
        result = payload.get("task_result")
        items = result.get("images", []) if isinstance(result, dict) else []
        if not isinstance(items, list):
            raise InvalidPayload("A kling callback's task_result.images is a list.")
        images = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise InvalidPayload("Each kling image is an object with a 'url'.")
            if not item["url"].strip():  # no image: a success of nothing else fails as empty_result
                continue
            image: JSON = {"url": item["url"]}
            if _is_int(item.get("index")):
                image["index"] = item["index"]
            images.append(image)
        if not images:
            return Report(TaskState.FAILED, upstream, error=_EMPTY, dialect=self.name)
        images.sort(key=lambda image: image.get("index", 0))
        return Report(state, upstream, images=tuple(images), dialect=self.name)


_APIMART_ENDS = ("completed", "failed", "cancelled", "canceled")


class ApimartDialect:
    name = "apimart"

    def detect(self, payload: JSON) -> bool:
        # Replicate's prediction objects also carry id + status; these keys are theirs alone.
        return (
            "id" in payload
            and ("progress" in payload or "result" in payload or payload.get("status") in _APIMART_ENDS)
            and not any(key in payload for key in ("output", "input", "version", "urls"))
        )

    def parse(self, payload: JSON) -> Report:
        upstream = optional_str(payload, "id")
        status = payload.get("status")
        if status is not None and not isinstance(status, str):
            raise InvalidPayload("An apimart callback's 'status' is a string.")
        progress = payload.get("progress")
        share = float(progress) if isinstance(progress, (int, float)) and not isinstance(progress, bool) else None
        if status == "failed":
            error = error_object(payload.get("error") or payload.get("fail_reason"), "generation_failed")
            return Report(TaskState.FAILED, upstream, error=error, progress=share, dialect=self.name)
        if status in ("cancelled", "canceled"):
            error = {"code": "upstream_cancelled", "message": "The task was cancelled on apimart."}
            return Report(TaskState.CANCELLED, upstream, error=error, progress=share, dialect=self.name)
        if status != "completed":
            return Report(TaskState.RUNNING, upstream, progress=share, dialect=self.name)
        result = payload.get("result")
        items = result.get("images", []) if isinstance(result, dict) else []
        if not isinstance(items, list):
            raise InvalidPayload("An apimart callback's result.images is a list.")
        images: list[JSON] = []
        for item in items:
            if not isinstance(item, dict):
                raise InvalidPayload("Each apimart image is an object.")
            urls = item.get("url")
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
                raise InvalidPayload("An apimart image's 'url' is a list of URLs.")
            extra = {"expires_at": item["expires_at"]} if item.get("expires_at") is not None else {}
            images.extend({"url": url, **extra} for url in urls if url.strip())
        if not images:
            return Report(TaskState.FAILED, upstream, error=_EMPTY, dialect=self.name)
        return Report(TaskState.SUCCEEDED, upstream, images=tuple(images), progress=share, dialect=self.name)
