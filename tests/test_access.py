"""Who may reach what (SECURITY.md): every `/v1` route refuses a missing or wrong key, the
dashboard page is open but its data is not, /metrics is open unless a token is set, callbacks
need a signed URL, keys are compared in constant time, and no log line carries a secret.

The route walk reads the app's own route table (mounted routes included), so a route added
later is covered without anyone remembering to list it; `test_the_walk_catches_a_route_without_auth`
proves the walk fails for a route that forgot the key.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from receiver import auth
from receiver.app import create_app
from receiver.auth import ApiKeys
from receiver.logs import JsonFormatter, get_logger
from receiver.signing import AssetSigner, CallbackSigner
from tests.conftest import API_KEY, KNOWN_SECRETS, SecretAudit, make_settings, start_receiver

pytestmark = pytest.mark.anyio

#: The management API has at least this many (path, method) pairs; the walk must see them all.
MIN_V1_ENDPOINTS = 20
WRONG_KEYS: tuple[dict[str, str], ...] = (
    {},  # no header at all
    {"authorization": "Bearer wrong"},
    {"authorization": f"Bearer {API_KEY}x"},  # the right key plus one character
    {"authorization": f"Bearer {API_KEY[:-1]}"},  # a prefix of the right key
    {"authorization": f"Basic {API_KEY}"},  # the right key under another scheme
    {"authorization": "Bearer "},
    {"authorization": API_KEY},  # no scheme
)


def endpoints(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, mounted ones included; HEAD is served for each GET."""
    for route in routes:
        if isinstance(route, Mount):
            yield from endpoints(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                yield method, prefix + route.path


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: f"x{m.group(1)}", path)


async def unguarded(app: Starlette, *, prefix: str = "/v1/") -> tuple[list[tuple[str, str]], list[str]]:
    """Every `prefix` endpoint x every wrong key; returns (the endpoints walked, what did not
    answer 401 unauthorized in the contract's error shape)."""
    walked = sorted({(m, p) for m, p in endpoints(app.routes) if p.startswith(prefix)})
    failures = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://receiver") as anonymous:
        for method, path in walked:
            for headers in WRONG_KEYS:
                answer = await anonymous.request(method, concrete(path), headers=headers, json={})
                problem = _refusal_problem(method, answer)
                if problem:
                    failures.append(f"{method} {path} with {headers or 'no key'}: {problem}")
    return walked, failures


def _refusal_problem(method: str, answer: httpx.Response) -> str | None:
    if answer.status_code != 401:
        return f"answered {answer.status_code}"
    if "bearer" not in answer.headers.get("www-authenticate", "").lower():
        return "no WWW-Authenticate: Bearer"
    if method == "HEAD":
        return None
    body = answer.json()
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or error.get("code") != "unauthorized":
        return f"body {body!r}"
    if not isinstance(error.get("message"), str) or set(error) - {"code", "message", "details"}:
        return f"error shape {error!r}"
    return None


async def test_every_v1_route_and_method_refuses_a_missing_or_wrong_key(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    async with app.router.lifespan_context(app):
        walked, failures = await unguarded(app)
    assert not failures, "\n".join(failures)
    assert len(walked) > MIN_V1_ENDPOINTS, walked
    assert {method for method, _ in walked} >= {"GET", "HEAD", "POST", "PATCH", "DELETE"}
    # The endpoints the contract names are among those walked.
    for expected in [
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/{task_id}/events"),
        ("GET", "/v1/stream"),
        ("POST", "/v1/subscriptions/{subscription_id}/rotate-secret"),
        ("POST", "/v1/deliveries/{delivery_id}/retry"),
        ("POST", "/v1/callback-urls"),
    ]:
        assert any(m == expected[0] and re.sub(r"\{\w+\}", "{}", p) == re.sub(r"\{\w+\}", "{}", expected[1])
                   for m, p in walked), expected


async def test_the_walk_catches_a_route_without_auth(tmp_path: Path) -> None:
    """The walk can fail: a `/v1` route added beside the authenticated mount is reported."""

    async def leak(request: Request) -> JSONResponse:
        return JSONResponse({"tasks": ["everything"]})

    app = create_app(make_settings(tmp_path))
    app.router.routes.insert(0, Route("/v1/leak", leak, methods=["GET", "DELETE"]))
    async with app.router.lifespan_context(app):
        walked, failures = await unguarded(app)
    assert ("GET", "/v1/leak") in walked and ("DELETE", "/v1/leak") in walked
    leaked = [f for f in failures if "/v1/leak" in f]
    # Three methods (GET, HEAD, DELETE) x every wrong key, and nothing else.
    assert len(leaked) == 3 * len(WRONG_KEYS) and len(failures) == len(leaked), failures


async def test_the_right_key_is_let_in(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        assert (await running.api.get("/v1/tasks")).status_code == 200
        rotated = make_settings(tmp_path / "rotated", api_keys=(Secret("new-key"), Secret(API_KEY)))
        app = create_app(rotated)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://r"
        ) as client:
            for key in ("new-key", API_KEY):  # every configured key works (rotation)
                answer = await client.get("/v1/tasks", headers={"authorization": f"bearer  {key} "})
                assert answer.status_code == 200, key


def test_api_keys_are_compared_as_digests_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest on equal-length digests, every configured key each time: no early exit
    on a match or on a length difference."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys(["first-key", "second", "a-much-longer-third-key-" * 4])
    for presented, found in [("first-key", True), ("x", False), ("second", True), ("y" * 500, False)]:
        calls.clear()
        assert (keys.identify(presented) is not None) is found
        assert calls == [(32, 32)] * 3, (presented, calls)
    assert keys.identify("first-key") != keys.identify("second")
    assert keys.identify("") is None and keys.check_header(None) is None


async def test_dashboard_page_is_open_its_data_is_not(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running, httpx.AsyncClient(base_url=running.url) as anonymous:
        for path in ("/ui", "/ui/app.js", "/ui/app.css"):
            page = await anonymous.get(path)
            assert page.status_code == 200, path
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert API_KEY not in page.text
        for data in ("/v1/tasks", "/v1/stream", "/v1/deliveries", "/v1/subscriptions"):
            refused = await anonymous.get(data)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", data


async def test_metrics_are_open_unless_a_token_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with start_receiver(tmp_path / "open") as running, httpx.AsyncClient(base_url=running.url) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 200
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/readyz")).status_code == 200

    lengths: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        lengths.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)  # the token is checked as API keys are
    token = "metrics-token-of-some-length"
    tokens = (Secret(token), Secret("the-next-token"))
    async with start_receiver(tmp_path / "closed", metrics_tokens=tokens) as running, httpx.AsyncClient(
        base_url=running.url
    ) as anonymous:
        for headers in [{}, {"authorization": "Bearer x"}, {"authorization": f"Bearer {token}0"},
                        {"authorization": f"Basic {token}"}, {"authorization": f"Bearer {API_KEY}"}]:
            refused = await anonymous.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["code"] == "unauthorized"
        for current in (token, "the-next-token"):  # a comma list while the token is rotated: either opens
            allowed = await anonymous.get("/metrics", headers={"authorization": f"Bearer {current}"})
            assert allowed.status_code == 200 and "receiver_callbacks_total" in allowed.text
        # healthz/readyz stay open for the orchestrator.
        assert (await anonymous.get("/readyz")).status_code == 200
    assert lengths and all(a == b == 32 for a, b in lengths), lengths


async def test_callbacks_need_a_url_this_receiver_signed(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        minted = await running.api.post("/v1/callback-urls", json={"provider": "kie"})
        assert minted.status_code == 201
        url: str = minted.json()["callback_url"]
        token = url.rsplit("/callbacks/", 1)[1]
        task_id = minted.json()["task"]["id"]
        body = {"code": 200, "msg": "ok", "data": {"taskId": "up-1", "info": {"resultImageUrl": "https://x/1.png"}}}
        forged = {
            "garbage": "not-a-token",
            "another key": CallbackSigner(["someone-elses-key"]).mint(task_id, max_age=3600, scope="kie"),
            "asset salt": AssetSigner(["test-signing-key"]).mint(task_id, max_age=3600),
            "tampered": token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
            "other task": token.replace(task_id, "tsk_other") if task_id in token else token + "x",
        }
        for name, bad in forged.items():
            answer = await running.post_callback(f"{running.url}/callbacks/{bad}", body,
                                                 headers={"authorization": f"Bearer {API_KEY}"})
            assert answer.status_code == 403, (name, answer.text)
            assert answer.json()["error"]["code"] == "invalid_signature", name
        expired = CallbackSigner(["test-signing-key"], clock=lambda: 1_000_000.0).mint(task_id, max_age=60, scope="kie")
        gone = await running.post_callback(f"{running.url}/callbacks/{expired}", body)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "callback_expired"
        task = (await running.api.get(f"/v1/tasks/{task_id}")).json()
        assert task["state"] == "submitted" and task["sequence"] == 1  # nothing forged was applied
        assert (await running.api.get(f"/v1/tasks/{task_id}/callbacks")).json()["data"] == []
        accepted = await running.post_callback(url, body)  # the API key is not needed: the URL is
        assert accepted.status_code == 200 and accepted.json()["ok"] is True


def test_the_secret_audit_can_fail() -> None:
    """The session-wide audit (conftest) catches each kind of leak it looks for, and passes
    what the receiver's redaction makes of the same values."""
    audit = SecretAudit()
    audit.formatter_ = logging.Formatter("%(message)s %(fields)s")  # no redaction: every value shows
    logger = logging.getLogger("audit-selftest")  # not "receiver": this test's leaks are on purpose
    logger.addHandler(audit)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        leaking = [
            *KNOWN_SECRETS,
            "whsec_c2VjcmV0LXJvdGF0ZWQ=",
            "http://127.0.0.1:8000/callbacks/WyJ0c2tfMSIsMzYwMF0.aGVsbG8.c2ln",
        ]
        for value in leaking:
            logger.info("leak", extra={"fields": {"note": [value]}})
        assert len(audit.leaks) == len(leaking), audit.leaks
        audit.formatter_, audit.leaks, audit.lines = JsonFormatter(), [], 0  # as production formats
        for value in leaking:
            logger.info("leak", extra={"fields": {"note": [value], "api_key": value}})
        assert audit.lines == len(leaking) and len(audit.leaks) == len(KNOWN_SECRETS) + 1  # unnamed raw secrets show
        audit.leaks.clear()
        log = get_logger("receiver.selftest")
        log._logger = logger  # the receiver's wrapper, its redaction, into the audit
        log.info("redacted", api_key=API_KEY, secret="whsec_c2VjcmV0", path="/callbacks/WyJ0c2tfMSJd.x.y")
        assert audit.leaks == []
    finally:
        logger.removeHandler(audit)


def test_secrets_nested_in_log_fields_are_redacted() -> None:
    """A secret is masked by its name and a token stripped from a path however deep the field holds
    them, and what JSON cannot hold is logged as redacted text."""
    record = logging.LogRecord("receiver.test", logging.INFO, __file__, 1, "nested", None, None)
    record.fields = {  # type: ignore[attr-defined]
        "request": {"headers": {"authorization": f"Bearer {API_KEY}", "x-fal-signature": "c2ln"}},
        "attempts": [{"url": "https://x.test/callbacks/WyJ0c2tfMSJd.aGk.c2ln", "api_key": API_KEY}],
        "target": httpx.URL("https://x.test/assets/WyJhc3NldCJd.aGk.c2ln/a.png"),
        "task_id": "tsk_1",
    }
    line = JsonFormatter().format(record)
    for secret in (API_KEY, "c2ln", "WyJ0c2tfMSJd", "WyJhc3NldCJd"):
        assert secret not in line, line
    assert '"task_id":"tsk_1"' in line and "/callbacks/[redacted]" in line and "/assets/[redacted]" in line


@pytest.mark.parametrize(
    "path",
    ["/callbacks/\r:g\x95[secret", "/callbacks/\tsecret", "/assets/\x0bsecret/x", "/callbacks/\nsecret\"/callback",
     '/callbacks/"secret\x0csecret', "/callbacks/'secret", "/callbacks/ secret",
     # however the path around the token is spelt (each a 404 whose access line holds the path)
     "/callbacks//secret", "/Callbacks/secret", "/x/callbacks;/secret", "/ASSETS//secret.png"],
)
def test_tokens_are_redacted_whatever_they_start_with(path: str) -> None:
    """Found by schemathesis: a callback path whose token began with a control character kept
    the rest of the token in the access log line."""
    from receiver.logs import redact_path

    assert "secret" not in redact_path(path)


def test_a_real_token_is_redacted_under_any_misspelt_prefix_or_none() -> None:
    """A mistyped callback URL is a 404 whose access line holds the path: the token must not be in it."""
    from receiver.logs import redact_path
    from receiver.signing import AssetSigner, CallbackSigner

    token = CallbackSigner(["k"]).mint("tsk_0193a7c2e4f07b3c9d2e1f0a4b5c6d7e", max_age=604800, scope="kling")
    asset = AssetSigner(["k"]).mint("f" * 64 + ".png", max_age=86400)
    for template in ("/callback/{}", "/callbacks\\{}", "/callbacks\t/{}", "/callbacks./{}", "/callbacks{}",
                     "/callbacks?{}", "/callbacks/x/{}", "/{}", "/v1/{}", "/ui/{}/x", "/asset/{}"):
        for secret in (token, asset):
            path = template.format(secret)
            redacted = redact_path(path)
            assert secret.rsplit(".", 1)[1] not in redacted and secret not in redacted, (path, redacted)
    assert redact_path("/ui/app.js") == "/ui/app.js" and redact_path("/v1/tasks/tsk_1") == "/v1/tasks/tsk_1"
