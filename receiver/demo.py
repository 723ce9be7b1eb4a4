"""`receiver demo`: a whole round trip on this machine, with no account anywhere.

A simulated provider, a subscriber endpoint and the receiver (on a temporary
SQLite file) start on 127.0.0.1; the subscriber is subscribed, one task is
submitted; every step is printed as it happens, down to the notifications the
subscriber received and verified with the `standardwebhooks` library.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from starlette.datastructures import Secret

from receiver.app import create_app
from receiver.config import ProviderSettings, Settings, new_webhook_secret
from receiver.fakes.provider import FakeProvider
from receiver.fakes.subscriber import FakeSubscriber
from receiver.server import free_port, serve_in_background

_json_lines = False


def say(step: str, detail: str = "") -> None:
    if _json_lines:  # `receiver demo --json`: one object per step
        print(orjson.dumps({"at": time.time(), "step": step, "detail": detail}).decode(), flush=True)
        return
    print(f"[{time.strftime('%H:%M:%S')}] {step}{(': ' + detail) if detail else ''}", flush=True)


async def run(delay: float = 1.0, *, json_lines: bool = False) -> int:
    global _json_lines
    _json_lines = json_lines
    with tempfile.TemporaryDirectory(prefix="receiver-demo-") as folder:
        fake = FakeProvider(delay=delay)
        subscriber = FakeSubscriber()
        async with serve_in_background(fake.app) as provider_url, serve_in_background(subscriber.app) as hook_url:
            say("simulated provider listening", provider_url)
            say("subscriber endpoint listening", f"{hook_url}/hooks/demo")
            port = free_port()
            receiver_url = f"http://127.0.0.1:{port}"
            api_key = "demo-key"
            settings = Settings(
                database_url=f"sqlite:///{folder}/receiver.db",
                public_url=receiver_url,
                data_dir=Path(folder),
                secret_keys=(Secret("demo-signing-key"),),
                api_keys=(Secret(api_key),),
                notify_secret=Secret(new_webhook_secret()),
                providers={"xhuoapi": ProviderSettings(url=provider_url, api_key=Secret("demo-provider-key"))},
                allow_private_urls=True,
                mirror_assets=False,
                asset_dir=Path(folder) / "assets",
            )
            async with serve_in_background(create_app(settings), port=port) as base:
                say("receiver listening", f"{base} (SQLite at {folder}/receiver.db)")
                headers = {"authorization": f"Bearer {api_key}"}
                async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as api:
                    subscribed = await api.post("/v1/subscriptions", json={"url": f"{hook_url}/hooks/demo"})
                    if subscribed.status_code != 201:
                        say("subscription refused", subscribed.text)
                        return 1
                    subscription = subscribed.json()
                    subscriber.secrets = [subscription["secret"]]
                    say(
                        "subscribed the endpoint to every task event",
                        f"{subscription['id']}, signing secret {subscription['secret'][:10]}…",
                    )
                    body = {
                        "provider": "xhuoapi",
                        "model": "gpt-image-2",
                        "prompt": "a lighthouse at dawn",
                        "size": "1024x1024",
                    }
                    say("submitting", "POST /v1/tasks " + str(body))
                    answer = await api.post("/v1/tasks", json=body)
                    task = answer.json()
                    if answer.status_code != 202:
                        say("submission refused", answer.text)
                        return 1
                    say(
                        f"provider accepted the task ({answer.status_code})",
                        f"{task['id']} upstream {task['upstream_task_id']}, state {task['state']}",
                    )
                    say("waiting for the provider's callback", f"GET /v1/tasks/{task['id']}?wait=30")
                    task = (await api.get(f"/v1/tasks/{task['id']}", params={"wait": 30})).json()
                    callbacks = (await api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
                    for callback in callbacks:
                        say(
                            "callback received and stored",
                            f"verdict {callback['verdict']}, reported {callback['reported_state']}",
                        )
                    if task["state"] != "succeeded":
                        say("task did not succeed", f"state {task['state']}, error {task['error']}")
                        return 1
                    say(
                        f"task {task['state']} (sequence {task['sequence']})",
                        ", ".join(i["url"] for i in task["result"]["images"]),
                    )
                    if not await _notified(subscriber, task["id"]):
                        say("the subscriber did not receive the task.succeeded notification in time")
                        return 1
        say("done", "every step above went over real sockets on 127.0.0.1")
    return 0


async def _notified(subscriber: FakeSubscriber, task_id: str, timeout: float = 10.0) -> bool:
    """Wait for the task's final notification, printing each one the subscriber verified."""
    printed = 0

    def show() -> bool:
        nonlocal printed
        for got in subscriber.verified[printed:]:
            say(
                f"notification received and verified: {got.type}",
                f"webhook-id {got.webhook_id}, sequence {got.sequence}, signature checked with standardwebhooks",
            )
            printed += 1
        return any(got.type == "task.succeeded" and got.task_id == task_id for got in subscriber.verified)

    try:
        await subscriber.wait_for(lambda _: show(), timeout=timeout)
    except TimeoutError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(asyncio.run(run()))
