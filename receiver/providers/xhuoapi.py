"""xhuoapi: an OpenAI-style image endpoint that posts the result to `callback_url`.

Submit: `POST {base}/v1/openai/images/generations` `{model, prompt, size?, …, callback_url}`
-> `{"task_id": "…"}`. Callback, success:
`{"success": true, "task_id", "trace_id", "data": {"created", "data": [{"url", "revised_prompt"}]}}`;
failure: `{"success": false, "task_id"?, "error": {"code", "message"}, "trace_id"}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from receiver.errors import InvalidPayload, ProviderError
from receiver.providers.base import (
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

PATH = "/v1/openai/images/generations"


class XhuoapiDialect:
    name = "xhuoapi"

    def detect(self, payload: JSON) -> bool:
        return isinstance(payload.get("success"), bool) and ("data" in payload or "error" in payload)

    def parse(self, payload: JSON) -> Report:
        success = payload.get("success")
        if not isinstance(success, bool):
            raise InvalidPayload("An xhuoapi callback has a boolean 'success'.")
        upstream = optional_str(payload, "task_id")
        if not success:
            return Report(
                TaskState.FAILED,
                upstream,
                error=error_object(payload.get("error"), "upstream_failed"),
                dialect=self.name,
            )
        data = payload.get("data")
        # A callback nests the answer (`data: {created, data: [...]}`); a synchronous answer, whose
        # shape a callback may also take, lists the images at the top (`data: [...]`).
        if isinstance(data, list):
            images = image_list(data)
        elif isinstance(data, dict):
            images = image_list(data.get("data", []))
        else:
            raise InvalidPayload("A successful xhuoapi callback carries 'data': an object, or the list of images.")
        if not images:
            error = {"code": "empty_result", "message": "The provider reported success without any image."}
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        return Report(TaskState.SUCCEEDED, upstream, images=images, dialect=self.name)


class XhuoapiProvider(HttpProvider):
    name = "xhuoapi"
    dialect = "xhuoapi"

    async def submit(self, task: Task, callback_url: str, uploads: Sequence[Upload] = ()) -> Submission:
        body = {"model": task.model, **task.request, "callback_url": callback_url}
        response = await self.call("POST", self.settings.url + PATH, json=body)
        answer = json_object(response, self.name)
        if answer.get("success") is False:  # a 2xx that still says no
            error = error_object(answer.get("error"), "upstream_error")
            raise ProviderError(
                f"{self.name}: {error['message']}",
                provider=self.name,
                code=error["code"],
                status_code=response.status_code,
                body=answer,
            )
        upstream = answer.get("task_id") if isinstance(answer.get("task_id"), str) else None
        report = None
        if isinstance(answer.get("data"), list) and answer["data"]:  # it answered with the image already
            report = self.answered_images(answer["data"], upstream, response, answer)
        if not upstream and report is None:
            raise self.garbled(f"{self.name} accepted the request but named no task_id.", response, answer)
        return Submission(upstream or None, report=report, raw=answer)
