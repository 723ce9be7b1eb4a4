"""The dashboard: its headers, and a real browser (headless Chromium driven by Playwright) using it.

The browser tests need Debian's `chromium` (installed by .ci/run when missing). Without it they
are skipped with the reason, unless RECEIVER_TEST_BROWSER=1 (set by .ci/run): then they fail.
A failing browser test leaves a screenshot and the page's console in tests/artifacts/.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.fakes.provider import FakeProvider
from receiver.routes.ui import CONTENT_SECURITY_POLICY
from receiver.server import serve_in_background
from tests.conftest import API_KEY, Running, start_receiver
from tests.delivery.helpers import deliveries, eventually, sink, subscribe

pytestmark = pytest.mark.anyio

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


async def test_the_page_needs_no_key_and_is_locked_down(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as anonymous:
        page = await anonymous.get("/ui")
        script = await anonymous.get("/ui/app.js")
        styles = await anonymous.get("/ui/app.css")
        data = await anonymous.get("/v1/stream")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    # No inline code anywhere: the policy would block it, and the page must not need it.
    assert "<script>" not in page.text and "<style" not in page.text and " style=" not in page.text
    assert ' src="/ui/app.js"' in page.text and ' href="/ui/app.css"' in page.text
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert styles.status_code == 200 and styles.headers["content-type"].startswith("text/css")
    for sink_ in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new EventSource("):
        assert sink_ not in script.text
    assert data.status_code == 401  # the data is the API's, and needs the key


# --- in a browser ---------------------------------------------------------------------------------


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh headless Chromium (its own profile folder), driven by Playwright."""
    missing = _missing()
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed: apt-get install -y chromium chromium-driver; "
            "pip install -e '.[test]' (.ci/run does both)"
        )
        if os.environ.get("RECEIVER_TEST_BROWSER") == "1":
            pytest.fail(f"RECEIVER_TEST_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


def _missing() -> list[str]:
    found = (("chromium", CHROMIUM.exists()), ("playwright", importlib.util.find_spec("playwright") is not None))
    return [what for what, ok in found if not ok]


class Watched:
    """A page, with everything it said and asked for kept."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append((request.url, request.headers)))

    def problems(self) -> list[str]:
        """Script errors, console errors (a refused resource, a policy violation) and policy warnings."""
        policy = [line for line in self.console if "Content Security Policy" in line or "Trusted Type" in line]
        return self.errors + [line for line in self.console if line.startswith("error:")] + policy


@asynccontextmanager
async def watched(context: Any, name: str) -> AsyncIterator[Watched]:
    """A new page; if the block fails, a screenshot and the console go to tests/artifacts/<name>.*"""
    page = Watched(await context.new_page())
    try:
        yield page
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        (ARTIFACTS / f"{name}.console.txt").write_text("\n".join(page.console + page.errors))
        raise


async def log_in(page: Any, url: str) -> None:
    await page.goto(f"{url}/ui")
    await page.fill("#key", API_KEY)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#live[data-state=live]")


def row(task_id: str, state: str | None = None) -> str:
    return f'tr.task[data-task-id="{task_id}"]' + (f'[data-state="{state}"]' if state else "")


async def test_watching_a_task_live_and_redelivering_from_the_dashboard(tmp_path: Path, browser: Any) -> None:
    provider = FakeProvider(delay=1.0)  # the result comes a second after the submission: watch it arrive
    async with (
        serve_in_background(provider.app) as provider_url,
        sink() as (subscriber, hook),
        start_receiver(tmp_path, provider_url=provider_url, mirror_assets=True) as running,
        watched(browser, "dashboard-live") as watching,
    ):
        page = watching.page
        await subscribe(running, hook)
        await log_in(page, running.url)
        await page.evaluate("window.notReloaded = true")

        # Submitted elsewhere (the API): the task appears, then turns succeeded, without a reload.
        note = '<img src=x id="pwned" onerror="window.pwned=1">'
        body = {"provider": "xhuoapi", "model": "nano-banana", "prompt": "a pear", "metadata": {"note": note}}
        task = (await running.api.post("/v1/tasks", json=body)).json()
        await page.wait_for_selector(row(task["id"], "submitted"))
        await page.wait_for_selector(row(task["id"], "succeeded"))
        # Its image, kept by the receiver, is shown from the receiver itself.
        thumbnail = f"{row(task['id'])} img.thumb"
        await page.wait_for_selector(thumbnail)
        assert (await page.get_attribute(thumbnail, "src") or "").startswith("/assets/")
        await page.wait_for_function(
            "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0 }",
            arg=thumbnail,
        )
        assert await page.evaluate("window.notReloaded") is True

        # Its detail: the callback with its verdict, the deliveries with their attempts.
        await page.click(row(task["id"]))
        await page.wait_for_selector(f'#detail[data-task-id="{task["id"]}"] .callback[data-verdict=accepted]')
        await page.click(".callback summary")
        [logged] = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert await page.text_content(".callback pre.body") == logged["raw_body"]  # as received, byte for byte
        assert '<img src=x id=\\"pwned\\"' in await page.inner_text("#summary")  # shown as text (JSON)…
        assert await page.locator("#pwned").count() == 0  # … never as markup
        assert await page.evaluate("window.pwned === undefined")
        await subscriber.wait_for(lambda got: any(r.type == "task.succeeded" for r in got))
        [succeeded] = [d for d in await deliveries(running, task_id=task["id"]) if d["event_type"] == "task.succeeded"]
        delivery = f'.delivery[data-delivery-id="{succeeded["id"]}"]'
        await page.wait_for_selector(f"{delivery}[data-status=succeeded] .attempt")
        assert await page.locator(f"{delivery} .attempt").count() == 1
        assert "200" in await page.inner_text(f"{delivery} .attempt .code")

        # Redeliver: the new attempt shows up by itself.
        await page.click(f"{delivery} button.redeliver")
        await page.wait_for_function(
            "s => document.querySelectorAll(s).length === 2", arg=f"{delivery} .attempt", timeout=10_000
        )
        await subscriber.wait_for(lambda got: sum(r.type == "task.succeeded" for r in got) == 2)
        # The callback opened above stayed open through those live redraws.
        assert await page.locator(".callback[open]").count() == 1
        # A task without images shows nothing where its images would be (not the word "null").
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "kling"})).json()["task"]
        await page.click(row(minted["id"]))
        await page.wait_for_selector(f'#detail[data-task-id="{minted["id"]}"] #summary h2')
        assert "null" not in await page.inner_text("#summary")

        assert watching.problems() == []
        for url, headers in watching.requests:
            assert API_KEY not in url  # the key is never in a URL …
            if "/v1/" in url:
                assert headers.get("authorization") == f"Bearer {API_KEY}"  # … only in the header


async def test_callback_verdicts_and_logging_out(tmp_path: Path, browser: Any) -> None:
    async with start_receiver(tmp_path) as running, watched(browser, "dashboard-verdicts") as watching:
        page = watching.page
        await log_in(page, running.url)
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        task_id = minted["task"]["id"]
        await page.wait_for_selector(row(task_id, "submitted"))
        await page.click(row(task_id))
        result = {"success": True, "task_id": "up-1", "data": {"data": [{"url": "javascript:alert(1)"}]}}
        await running.post_callback(minted["callback_url"], result)
        await running.post_callback(minted["callback_url"], result)  # the same again: a duplicate
        await page.wait_for_selector(".callback[data-verdict=duplicate]")
        assert await page.locator(".callback[data-verdict=accepted]").count() == 1
        assert await page.locator('#summary a[href^="javascript:"]').count() == 0  # a hostile URL is no link

        # The key is kept for the tab: a reload needs no new login; forgetting it asks again.
        await page.reload()
        await page.wait_for_selector("#live[data-state=live]")
        await page.click("#logout")
        await page.wait_for_selector("#login-view:not([hidden])")
        assert await page.evaluate("sessionStorage.length") == 0
        await eventually(lambda: _no_stream(running))
        assert watching.problems() == []
        await page.fill("#key", "wrong-key")
        await page.click("#login button[type=submit]")
        await page.wait_for_selector("#login-error:has-text('refused')")
        assert await page.evaluate("sessionStorage.length") == 0


async def _no_stream(running: Running) -> bool:
    return running.ctx.store.feed.watcher_count() == 0
