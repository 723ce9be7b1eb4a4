"""A simulated image provider, for the demo, the tests and tunnel testing without credits.

    fake = FakeProvider(delay=2.0, fail_rate=0.1, duplicate_rate=0.1, out_of_order_rate=0.1)
    app = fake.app                                   # serve it anywhere

It speaks every dialect the receiver knows:

- xhuoapi  `POST /v1/openai/images/generations`: answers a `task_id` at once, posts the result to
  the request's `callback_url` after `delay` seconds.
- xenodia  `POST /v1/images/generations` with `async: true` (JSON or multipart with `image` files):
  answers `202` with a task envelope; `GET /v1/tasks/{id}` then answers waiting -> running ->
  succeeded (or failed) as time passes, one step per poll at most.
- router   `POST /v1/images/generations` without `async`: answers `200 {"created", "data", "usage"}`
  after `delay` seconds, images as `url`, or `b64_json` with `[b64]` in the prompt.
- kie, kling, apimart (and xhuoapi): `POST /_fake/callbacks/{dialect}` with
  `{"callback_url": "<a URL from receiver callback-url>", "prompt"?, "fail"?, "duplicate"?,
  "out_of_order"?, "delay"?}` posts that dialect's progress and result callbacks to the URL
  (apimart: to `<url>/callback`), as a task another service submitted would get them.

Faults are injected at random (`fail_rate`, `duplicate_rate`, `out_of_order_rate`: a late progress
callback after the result, for the dialects that have progress) or on demand with markers in the
prompt:

    [refuse:402]   answer the submission with that HTTP error
    [fail]         the task fails (failure callback, failed task, or an error answer)
    [duplicate]    post the result callback twice
    [out-of-order] post a progress callback after the result
    [silent]       never call back (xenodia: the task stays waiting)
    [early]        xhuoapi: post the callback before answering the submission
    [flaky]        xenodia: the first polls answer 503, then garbage, then the task
    [nested]       xenodia: a finished task carries `result.data` and says `completed`
    [b64]          router: images as `b64_json`
    [hang]         xhuoapi, xenodia: never answer the submission (until the caller hangs up)
    [hang-poll]    xenodia: the first poll is never answered (until the caller hangs up), then the task
    [wrong-shape]  xenodia: the first poll answers JSON that is not a task object, then the task
    [mixed-up]     xenodia: the first poll answers another task, still waiting, then the task
    [long-id]      xenodia: the submission is answered with a task id of 300 characters

Everything it receives is listed at `GET /_fake/requests` (Authorization headers reduced to
whether one was present; uploaded files as name, type, size and sha256; their bytes are in
`fake.files` for in-process tests), so a test can assert that a request was, or was not, sent.

It also plays Replicate and fal, signing their callbacks as they do
(`receiver.fakes.signed`): `replicate_secret` is the Standard Webhooks
secret (generated if not given), and fal's key set is served at
`GET /.well-known/jwks.json`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.fakes.signed import SignedFakes
from receiver.logs import get_logger, redact_path

log = get_logger("receiver.fake_provider")

# A 1x1 PNG, served as every generated "image".
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
_REFUSE = re.compile(r"\[refuse:(\d{3})\]")
#: How long `[hang]` and `[hang-poll]` hold a request whose caller does not hang up.
HANG_SECONDS = 300.0


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class FakeProvider:
    def __init__(
        self,
        *,
        delay: float = 2.0,
        fail_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        out_of_order_rate: float = 0.0,
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        replicate_secret: str | None = None,
    ) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.duplicate_rate = duplicate_rate
        self.out_of_order_rate = out_of_order_rate
        self.random = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []  # uploaded files, with their bytes
        self.callbacks_sent: list[dict[str, Any]] = []
        self.tasks: dict[str, dict[str, Any]] = {}  # xenodia tasks
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.signed = SignedFakes(self, replicate_secret=replicate_secret)
        self.app = Starlette(
            routes=[
                Route("/v1/openai/images/generations", self.xhuoapi_submit, methods=["POST"]),
                Route("/v1/images/generations", self.images_generations, methods=["POST"]),
                Route("/v1/tasks/{task_id}", self.xenodia_task, methods=["GET"]),
                Route("/_fake/callbacks/{dialect}", self.simulate_callbacks, methods=["POST"]),
                Route("/images/{name}", self.image, methods=["GET"]),
                Route("/_fake/requests", self.list_requests, methods=["GET"]),
                Route("/_fake/reset", self.reset, methods=["POST"]),
                *self.signed.routes,
            ],
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(transport=self._transport, timeout=10.0) as client:
            self._client = client
            try:
                yield
            finally:
                for task in list(self._pending):
                    task.cancel()
                await asyncio.gather(*self._pending, return_exceptions=True)
                self._client = None

    # --- bookkeeping ------------------------------------------------------------
    async def _record(self, request: Request) -> Any:
        body = await request.body()
        parsed: Any = None
        form: dict[str, Any] | None = None
        files: list[dict[str, Any]] = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = {}
            async with request.form() as data:
                for name, value in data.multi_items():
                    if isinstance(value, UploadFile):
                        content = await value.read()
                        described = {
                            "field": name,
                            "filename": value.filename,
                            "content_type": value.content_type,
                            "size": len(content),
                            "sha256": hashlib.sha256(content).hexdigest(),
                        }
                        files.append(described)
                        self.files.append({**described, "data": content})
                    else:
                        form.setdefault(name, []).append(value)
            parsed = {name: values[0] if len(values) == 1 else values for name, values in form.items()}
        else:
            try:
                parsed = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                parsed = None
        entry = {
            "method": request.method,
            "path": request.url.path,
            "query": str(request.url.query),
            "authorized": "authorization" in request.headers,
            "content_type": request.headers.get("content-type"),
            "json": None if form is not None else parsed,
            "form": form,
            "files": files,
            "size": len(body),
            "at": time.time(),
        }
        self.requests.append(entry)
        return parsed

    async def list_requests(self, request: Request) -> Response:
        return _json({"data": self.requests, "callbacks_sent": self.callbacks_sent})

    async def reset(self, request: Request) -> Response:
        self.requests.clear()
        self.files.clear()
        self.callbacks_sent.clear()
        self.tasks.clear()
        return _json({"ok": True})

    async def image(self, request: Request) -> Response:
        """The generated "image"; for mirroring tests, `?status=503` answers that error, `?type=text/html`
        declares another type, `?size=N` pads the PNG to N bytes, `?bytes=text` sends no image at all
        and `?delay=S` answers after S seconds."""
        query = request.query_params
        if query.get("delay"):
            await asyncio.sleep(float(query["delay"]))
        status = query.get("status", "200")
        if status != "200" and status.isdigit():
            return Response(b"unavailable", status_code=int(status), media_type="text/plain")
        body = PNG if query.get("bytes") != "text" else b"<html>not an image</html>"
        if query.get("size", "").isdigit():
            body = body.ljust(int(query["size"]), b"\0")
        media_type = query.get("type", "image/png")
        return Response(body, media_type=media_type, headers={"cache-control": "no-store"})

    def later(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` after `delay` seconds in the background (cancelled at shutdown)."""

        async def run() -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await action()
            except Exception as exc:
                log.warning("fake.callback_failed", error=repr(exc)[:300])

        task = asyncio.create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def post_callback(self, url: str, body: Any, *, headers: dict[str, str] | None = None) -> int:
        """POST `body` (an object, or the exact bytes a signature covers) to `url`."""
        assert self._client is not None, "the fake provider is not running"
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        response = await self._client.post(
            url, content=raw, headers={"content-type": "application/json", **(headers or {})}
        )
        self.callbacks_sent.append({"url": redact_path(url), "status": response.status_code, "body": orjson.loads(raw)})
        log.info("fake.callback_sent", url=redact_path(url), status=response.status_code)
        return response.status_code

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate

    # --- xhuoapi ----------------------------------------------------------------
    async def xhuoapi_submit(self, request: Request) -> Response:
        body = await self._record(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return _json({"success": False, "error": {"code": "bad_request", "message": "prompt is required"}}, 400)
        prompt: str = body["prompt"]
        if "[hang]" in prompt:
            await _pause(request, HANG_SECONDS)
        refuse = _REFUSE.search(prompt)
        if refuse:
            status = int(refuse.group(1))
            error = {"code": f"http_{status}", "message": f"refused with {status} as the prompt asked"}
            return _json({"success": False, "error": error, "trace_id": str(uuid.uuid4())}, status)
        task_id = str(uuid.uuid4())
        callback_url = body.get("callback_url")
        if isinstance(callback_url, str) and "[silent]" not in prompt:
            failed = "[fail]" in prompt or self._roll(self.fail_rate)
            payload = self.xhuoapi_result(task_id, prompt, str(request.base_url).rstrip("/"), failed=failed)
            copies = 2 if "[duplicate]" in prompt or self._roll(self.duplicate_rate) else 1

            async def deliver() -> None:
                for _ in range(copies):
                    await self.post_callback(callback_url, payload)

            if "[early]" in prompt:
                await deliver()  # the callback lands before the submission is answered
            else:
                self.later(self.delay, deliver)
        return _json({"task_id": task_id})

    @staticmethod
    def xhuoapi_result(task_id: str, prompt: str, base_url: str, *, failed: bool) -> dict[str, Any]:
        trace = str(uuid.uuid4())
        if failed:
            error = {"code": "generation_failed", "message": "The simulated provider failed this task."}
            return {"success": False, "task_id": task_id, "error": error, "trace_id": trace}
        image = {"url": f"{base_url}/images/{task_id}_0.png", "revised_prompt": prompt}
        return {
            "success": True,
            "task_id": task_id,
            "trace_id": trace,
            "data": {"created": int(time.time()), "data": [image]},
        }

    def _refusal(self, prompt: str) -> Response | None:
        refuse = _REFUSE.search(prompt)
        if not refuse:
            return None
        status = int(refuse.group(1))
        error = {"code": f"http_{status}", "message": f"refused with {status} as the prompt asked"}
        return _json({"error": error}, status)

    # --- xenodia (async: true) and router (synchronous) ---------------------------
    async def images_generations(self, request: Request) -> Response:
        body = await self._record(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body.get("model"):
            return _json({"error": {"code": "invalid_request", "message": "model and prompt are required"}}, 400)
        refused = self._refusal(body["prompt"])
        if refused is not None:
            return refused
        if "[hang]" in body["prompt"]:
            await _pause(request, HANG_SECONDS)
        if body.get("async") in (True, "true"):
            return self.xenodia_accept(body)
        return await self.router_answer(request, body)

    def xenodia_accept(self, body: dict[str, Any]) -> Response:
        prompt: str = body["prompt"]
        task_id = f"task_{uuid.uuid4().hex[:16]}" + ("x" * 279 if "[long-id]" in prompt else "")
        self.tasks[task_id] = {
            "model": body["model"],
            "prompt": prompt,
            "created": time.monotonic(),
            "stage": 0,
            "polls": 0,
            "failed": "[fail]" in prompt or self._roll(self.fail_rate),
        }
        envelope = {
            "task_id": task_id,
            "object": "task",
            "model": body["model"],
            "type": "image",
            "state": "waiting",
            "created_at": int(time.time()),
            "poll_url": f"/v1/tasks/{task_id}",
        }
        return _json(envelope, 202)

    async def xenodia_task(self, request: Request) -> Response:
        await self._record(request)
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return _json({"error": {"code": "not_found", "message": "no such task"}}, 404)
        task["polls"] += 1
        prompt: str = task["prompt"]
        if "[hang-poll]" in prompt and task["polls"] == 1:
            await _pause(request, HANG_SECONDS)
        if "[wrong-shape]" in prompt and task["polls"] == 1:
            return _json({"status": "who knows", "items": [1, 2, 3]})
        if "[flaky]" in prompt and task["polls"] <= 2:
            if task["polls"] == 1:
                return _json({"error": {"code": "unavailable", "message": "try again"}}, 503)
            return Response(b"<html>bad gateway</html>", media_type="text/html")
        if "[silent]" not in prompt:
            elapsed = time.monotonic() - task["created"]
            by_time = 0 if elapsed < self.delay / 3 else 1 if elapsed < self.delay else 2
            task["stage"] = min(task["stage"] + 1, by_time)  # one step per poll at most, never back
        nested = "[nested]" in prompt
        states = ("waiting", "processing" if nested else "running", "completed" if nested else "succeeded")
        task_id = request.path_params["task_id"]
        if "[mixed-up]" in prompt and task["polls"] == 1:
            return _json({"task_id": f"{task_id}-another", "object": "task", "state": "waiting", "progress": 0})
        answer: dict[str, Any] = {"task_id": task_id, "object": "task", "model": task["model"], "type": "image"}
        if task["stage"] < 2:
            return _json({**answer, "state": states[task["stage"]], "progress": task["stage"] * 50})
        if task["failed"]:
            error = {"code": "generation_failed", "message": "The simulated provider failed this task."}
            return _json({**answer, "state": "failed", "error": error})
        images = [{"url": f"{str(request.base_url).rstrip('/')}/images/{task_id}_0.png"}]
        if nested:
            return _json({**answer, "state": states[2], "result": {"data": images}})
        return _json({**answer, "state": states[2], "data": images, "progress": 100})

    async def router_answer(self, request: Request, body: dict[str, Any]) -> Response:
        prompt: str = body["prompt"]
        await _pause(request, self.delay)  # a synchronous router takes its time
        if "[fail]" in prompt or self._roll(self.fail_rate):
            error = {"code": "generation_failed", "message": "The simulated provider failed this task."}
            return _json({"error": error}, 502)
        count = body["n"] if isinstance(body.get("n"), int) else 1
        base = str(request.base_url).rstrip("/")
        if "[b64]" in prompt:
            data = [{"b64_json": base64.b64encode(PNG).decode()} for _ in range(count)]
        else:
            data = [{"url": f"{base}/images/{uuid.uuid4().hex}_{i}.png"} for i in range(count)]
        return _json({"created": int(time.time()), "data": data, "usage": {"images": count, "cost": 0}})

    # --- callbacks of tasks another service submitted ----------------------------------
    async def simulate_callbacks(self, request: Request) -> Response:
        """Post one task's callbacks in `dialect` to a callback URL minted by the receiver."""
        body = await self._record(request)
        dialect = request.path_params["dialect"]
        if dialect not in CALLBACK_SHAPES:
            error = {"code": "unknown_dialect", "message": f"dialects: {', '.join(CALLBACK_SHAPES)}"}
            return _json({"error": error}, 404)
        if not isinstance(body, dict) or not isinstance(body.get("callback_url"), str):
            return _json({"error": {"code": "invalid_request", "message": "callback_url is required"}}, 400)
        prompt = str(body.get("prompt", ""))
        failed = body.get("fail") is True or "[fail]" in prompt or self._roll(self.fail_rate)
        duplicate = body.get("duplicate") is True or "[duplicate]" in prompt or self._roll(self.duplicate_rate)
        late = body.get("out_of_order") is True or "[out-of-order]" in prompt or self._roll(self.out_of_order_rate)
        delay = float(body["delay"]) if isinstance(body.get("delay"), (int, float)) else self.delay
        task_id = str(uuid.uuid4())
        target = body["callback_url"] + ("/callback" if dialect == "apimart" else "")
        progress, result, stale = CALLBACK_SHAPES[dialect](task_id, str(request.base_url).rstrip("/"), failed)
        plan = [*progress, result, *([result] if duplicate else []), *([stale] if late and stale else [])]
        step = delay / (len(progress) + 1)

        async def deliver() -> None:
            for index, payload in enumerate(plan):
                if index <= len(progress):
                    await asyncio.sleep(step)
                await self.post_callback(target, payload)

        self.later(0, deliver)
        return _json({"task_id": task_id, "dialect": dialect, "callbacks": len(plan)})


async def _pause(request: Request, seconds: float) -> None:
    """Wait `seconds`, or less if the client hangs up (as a caller that timed out does)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass


Payload = dict[str, Any]


Shape = tuple[list[Payload], Payload, Payload | None]  # progress callbacks, the result, a late progress


def _kie(task_id: str, base: str, failed: bool) -> Shape:
    if failed:
        return [], {"code": 501, "msg": "The simulated provider failed this task.", "data": {"taskId": task_id}}, None
    info = {"resultImageUrl": f"{base}/images/{task_id}_0.png", "originImageUrl": f"{base}/images/{task_id}_o.png"}
    return [], {"code": 200, "msg": "success", "data": {"taskId": task_id, "info": info}}, None


def _kling(task_id: str, base: str, failed: bool) -> Shape:
    now = int(time.time() * 1000)

    def status(name: str, **extra: Any) -> Payload:
        updated = int(time.time() * 1000)
        return {
            "task_id": task_id,
            "task_status": name,
            "task_status_msg": "",
            "created_at": now,
            "updated_at": updated,
            **extra,
        }

    progress = [status("submitted"), status("processing")]
    late = {**status("processing"), "updated_at": now + 1}  # a retry of "processing", sent after the result
    if failed:
        return progress, status("failed", task_status_msg="The simulated provider failed this task."), late
    images = [{"index": 0, "url": f"{base}/images/{task_id}_0.png"}]
    return progress, status("succeed", task_result={"images": images}), late


def _apimart(task_id: str, base: str, failed: bool) -> Shape:
    progress: list[Payload] = [{"id": task_id, "status": "processing", "progress": 50}]
    late = {"id": task_id, "status": "processing", "progress": 90}
    if failed:
        error = {"code": "generation_failed", "message": "The simulated provider failed this task."}
        return progress, {"id": task_id, "status": "failed", "progress": 100, "error": error}, late
    image = {"url": [f"{base}/images/{task_id}_0.png"], "expires_at": int(time.time()) + 86400}
    return progress, {"id": task_id, "status": "completed", "progress": 100, "result": {"images": [image]}}, late


def _xhuoapi(task_id: str, base: str, failed: bool) -> Shape:
    return [], FakeProvider.xhuoapi_result(task_id, "a simulated task", base, failed=failed), None


#: Each dialect's (progress callbacks, result callback) for one task.
CALLBACK_SHAPES = {"xhuoapi": _xhuoapi, "kie": _kie, "kling": _kling, "apimart": _apimart}
