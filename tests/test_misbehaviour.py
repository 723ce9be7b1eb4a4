"""Providers that misbehave: callbacks scrambled or of the wrong shape, submissions and polls that
hang, polls answered with errors or garbage. The task ends in the right state, the misbehaviour
shows in the task's callback log (GET /v1/tasks/{id}/callbacks), nothing answers 5xx or crashes.

(tests/test_e2e.py has a duplicate, a conflicting success/failure, an early callback and the
plain refusals; tests/test_providers_xenodia.py that a 503 and an HTML poll answer are retried.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from receiver.fakes.provider import FakeProvider
from receiver.server import serve_in_background
from tests.conftest import Running, start_receiver

pytestmark = pytest.mark.anyio

XENODIA = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "a lighthouse", "resolution": "2K"}
POLLS = {"poll_interval": 0.02, "poll_max_interval": 0.1}


@asynccontextmanager
async def against_fake(
    tmp_path: Path, *, delay: float = 0.2, **overrides: Any
) -> AsyncIterator[tuple[FakeProvider, Running]]:
    """The receiver with every provider at a FakeProvider of its own (markers in the prompt misbehave)."""
    fake = FakeProvider(delay=delay)
    async with serve_in_background(fake.app) as url, start_receiver(tmp_path, provider_url=url, **overrides) as running:
        yield fake, running


async def callbacks(running: Running, task_id: str) -> list[dict[str, Any]]:
    answer = await running.api.get(f"/v1/tasks/{task_id}/callbacks")
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


async def finished(running: Running, task_id: str, wait: float = 20) -> dict[str, Any]:
    task: dict[str, Any] = (await running.api.get(f"/v1/tasks/{task_id}", params={"wait": wait})).json()
    return task


async def test_kling_callbacks_out_of_order_duplicated_and_late(running: Running) -> None:
    minted = (await running.api.post("/v1/callback-urls", json={"provider": "kling"})).json()
    task_id, url = minted["task"]["id"], minted["callback_url"]

    def kling(status: str, updated: int, **extra: Any) -> dict[str, Any]:
        return {"task_id": "k-1", "task_status": status, "task_status_msg": "", "created_at": 1, "updated_at": updated,
                **extra}

    done = kling("succeed", 4, task_result={"images": [{"index": 0, "url": "https://cdn.example/k.png"}]})
    # The provider's retries and reordering: the result first, then older progress, then the result again.
    for body in (kling("processing", 2), done, kling("submitted", 1), kling("processing", 3), done):
        answer = await running.post_callback(url, body)
        assert answer.status_code == 200, answer.text
    task = (await running.api.get(f"/v1/tasks/{task_id}")).json()
    assert task["state"] == "succeeded"
    assert task["result"]["images"][0]["url"] == "https://cdn.example/k.png"
    assert task["sequence"] == minted["task"]["sequence"] + 2  # running, succeeded: nothing else moved it
    logged = await callbacks(running, task_id)
    assert [(c["verdict"], c["reason"]) for c in logged] == [
        ("accepted", None), ("accepted", None), ("ignored", "late"), ("ignored", "late"), ("duplicate", "duplicate"),
    ]


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("xhuoapi", {"success": True, "task_id": "u", "data": {"data": "not a list"}}),
        ("xhuoapi", {"success": True, "task_id": "u", "data": {"data": [{"url": 5}]}}),
        ("xhuoapi", {"success": "yes", "task_id": ["u"]}),
        ("xhuoapi", {"success": False, "task_id": "u", "error": "plain string"}),
        ("kie", {"code": 200, "msg": "ok", "data": {"taskId": "t", "info": "nope"}}),
        ("kie", {"code": "200", "data": None}),
        ("kling", {"task_id": "k", "task_status": "succeed", "task_result": {"images": [None, 3]}}),
        ("kling", {"task_id": 7, "task_status": ["succeed"]}),
        ("apimart", {"id": "a", "status": "completed", "result": {"images": [{"url": "x"}]}}),
        ("apimart", {"id": "a", "status": "completed", "result": {"images": "x"}}),
        ("auto", {"task_status": "succeed"}),
        ("auto", {"code": 500}),
        ("auto", {"status": None, "id": None}),
    ],
)
async def test_malformed_callbacks_are_refused_or_recorded_never_a_crash(
    running: Running, provider: str, body: dict[str, Any]
) -> None:
    minted = (await running.api.post("/v1/callback-urls", json={"provider": provider})).json()
    task_id = minted["task"]["id"]
    answer = await running.post_callback(minted["callback_url"], body)
    assert answer.status_code < 500, answer.text
    if answer.status_code == 200:  # understood after all: then it is in the log
        assert len(await callbacks(running, task_id)) == 1
    else:
        assert answer.status_code in (400, 409), answer.text
        assert answer.json()["error"]["code"] in ("invalid_payload", "task_mismatch")
        assert await callbacks(running, task_id) == []
        assert (await running.api.get(f"/v1/tasks/{task_id}")).json()["state"] == "submitted"


@pytest.mark.parametrize("provider", ["xhuoapi", "xenodia"])
async def test_a_submission_that_hangs_fails_the_task_with_a_clear_error(tmp_path: Path, provider: str) -> None:
    async with against_fake(tmp_path, delay=0.05, provider_timeout=0.5) as (_, running):
        body = {"xhuoapi": {"provider": "xhuoapi", "model": "nano-banana", "prompt": "[hang] a pear"},
                "xenodia": {**XENODIA, "prompt": "[hang] a lighthouse"}}[provider]
        started = time.monotonic()
        answer = await running.api.post("/v1/tasks", json=body)
        assert time.monotonic() - started < 3
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "upstream_timeout" and "0.5" in error["message"]
        task = answer.json()["task"]
        assert task["state"] == "failed" and task["error"]["code"] == "upstream_timeout"
        stored = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert stored["state"] == "failed" and stored["error"] == task["error"]


async def test_a_submission_answered_with_a_task_id_no_database_can_keep_fails_as_garbled(tmp_path: Path) -> None:
    async with against_fake(tmp_path) as (_, running):
        answer = await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "[long-id] a lighthouse"})
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "upstream_garbled"
        task = (await running.api.get(f"/v1/tasks/{answer.json()['task']['id']}")).json()
        assert task["state"] == "failed" and task["upstream_task_id"] is None
        assert task["error"]["code"] == "upstream_garbled" and "256" in task["error"]["message"]


async def test_a_poll_that_hangs_is_retried_and_shown(tmp_path: Path) -> None:
    async with against_fake(tmp_path, provider_timeout=0.5, **POLLS) as (_, running):
        task = (await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "[hang-poll] a lighthouse"})).json()
        done = await finished(running, task["id"])
        assert done["state"] == "succeeded"
        failures = [c for c in await callbacks(running, task["id"]) if c["reason"] == "poll_failed"]
        assert len(failures) == 1
        assert failures[0]["verdict"] == "ignored" and failures[0]["headers"]["x-receiver-source"] == "poll"
        assert failures[0]["body"]["error"]["code"] == "upstream_timeout"
        assert failures[0]["reported_state"] is None


async def test_polls_answered_with_errors_garbage_or_the_wrong_shape_are_retried_and_shown(tmp_path: Path) -> None:
    async with against_fake(tmp_path, **POLLS) as (_, running):
        flaky = (await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "[flaky] a lighthouse"})).json()
        shaped = (await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "[wrong-shape] a lighthouse"})).json()
        assert (await finished(running, flaky["id"]))["state"] == "succeeded"
        assert (await finished(running, shaped["id"]))["state"] == "succeeded"

        logged = await callbacks(running, flaky["id"])
        failures = [c for c in logged if c["reason"] == "poll_failed"]
        assert [(f["body"]["error"]["code"], f["body"]["error"].get("status_code")) for f in failures] == [
            ("upstream_error", 503), ("upstream_garbled", 200)]
        assert "bad gateway" in failures[1]["body"]["error"]["body"]  # what the provider sent, for a person to read
        assert logged[-1]["reported_state"] == "succeeded" and logged[-1]["verdict"] == "accepted"

        failures = [c for c in await callbacks(running, shaped["id"]) if c["reason"] == "poll_failed"]
        assert len(failures) == 1
        assert failures[0]["body"]["error"]["code"] == "invalid_payload"


async def test_a_poll_answered_about_another_task_is_retried_and_shown(tmp_path: Path) -> None:
    async with against_fake(tmp_path, **POLLS) as (_, running):
        task = (await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "[mixed-up] a lighthouse"})).json()
        done = await finished(running, task["id"])
        assert done["state"] == "succeeded" and done["result"]["images"], done  # the other task's success is not taken
        logged = await callbacks(running, task["id"])
        [failure] = [c for c in logged if c["reason"] == "poll_failed"]
        assert failure["body"]["error"]["code"] == "task_mismatch"
        assert f"{task['upstream_task_id']}-another" in failure["body"]["error"]["message"]
        assert logged[-1]["reported_state"] == "succeeded" and logged[-1]["verdict"] == "accepted"


async def test_a_provider_that_only_ever_fails_polls_fills_no_log_and_the_task_expires(tmp_path: Path) -> None:
    async with against_fake(tmp_path, task_timeout=1.5, **POLLS) as (fake, running):
        task = (await running.api.post("/v1/tasks", json={**XENODIA, "prompt": "a lighthouse"})).json()
        fake.tasks.clear()  # the provider forgets it: every poll is a 404 from now on
        done = await finished(running, task["id"], wait=10)
        assert done["state"] == "expired"
        polls = [r for r in fake.requests if r["path"].startswith("/v1/tasks/")]
        assert len(polls) >= 5
        failures = [c for c in await callbacks(running, task["id"]) if c["reason"] == "poll_failed"]
        assert len(failures) == 1  # the same failure in a row is shown once, not once per poll
        assert failures[0]["body"]["error"]["code"] == "upstream_not_found"
