"""router: an OpenRouter-style image router that answers synchronously, sometimes after minutes.

Call: `POST {base}/v1/images/generations` `{model, prompt, aspect_ratio?, resolution?, size?, n?,
seed?, quality?, output_format?, background?, output_compression?, input_references?, provider?}`
(the client names `provider` `provider_options`: `provider` says which provider the receiver uses;
the client gives `input_references` as URLs, the router takes `{"type": "image_url", "image_url":
{"url"}}` objects)
-> `200 {"created", "data": [{"url"} or {"b64_json"}], "usage"}`.

The receiver never makes this call while a client waits: a background job of kind "router" does
(receiver/sync_calls.py) and records the answer like a callback.
"""

from __future__ import annotations

import httpx

from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload, ProviderError
from receiver.providers.base import (
    Answer,
    bearer_headers,
    call,
    error_object,
    image_list,
    json_object,
    optional_str,
)
from receiver.tasks import Report, Task
from receiver.types import JSON, TaskState

PATH = "/v1/images/generations"


class RouterProvider:
    name = "router"
    dialect = "router"

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client

    async def generate(self, task: Task, *, timeout: float) -> Answer:
        body = {"model": task.model, **task.request}
        if "provider_options" in body:  # the router's `provider` object; that name is ours (which provider)
            body["provider"] = body.pop("provider_options")
        if isinstance(body.get("input_references"), list):  # URLs here; the router takes image_url objects
            body["input_references"] = [
                {"type": "image_url", "image_url": {"url": url}} for url in body["input_references"]
            ]
        response = await call(
            self.client,
            "POST",
            self.settings.url + PATH,
            provider=self.name,
            timeout=timeout,
            json=body,
            headers=bearer_headers(self.settings),
        )
        payload = json_object(response, self.name)
        if payload.get("error") and not payload.get("data"):  # a 200 that still says no
            error = error_object(payload["error"], "upstream_error")
            raise ProviderError(
                f"{self.name}: {error['message']}",
                provider=self.name,
                code=error["code"],
                status_code=response.status_code,
                body=payload,
            )
        return Answer(response.content, payload, response.headers.get("content-type"))

    def read(self, payload: JSON) -> Report:
        data = payload.get("data")
        if not isinstance(data, list):
            raise InvalidPayload("A router answer carries a 'data' list.")
        images = image_list(data)
        upstream = optional_str(payload, "id")  # some routers name the generation; kept if so
        if not images:
            error = {"code": "empty_result", "message": "The provider answered without any image."}
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        return Report(TaskState.SUCCEEDED, upstream, images=images, dialect=self.name)
