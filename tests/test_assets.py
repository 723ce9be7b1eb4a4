from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import pytest

from receiver.assets import Asset, AssetStore, decode_inline, sniff, without_inline_images
from receiver.clock import FakeClock
from receiver.errors import CallbackExpired, InvalidPayload, InvalidSignature, NotFound
from receiver.fakes.provider import PNG
from receiver.logs import redact_path
from receiver.signing import AssetSigner, CallbackSigner
from receiver.tasks import Report
from receiver.types import TaskState
from tests.conftest import Running

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 32
GIF = b"GIF89a" + b"\x00" * 16
AVIF = b"\x00\x00\x00\x1cftypavif" + b"\x00" * 16


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(PNG, "image/png", id="png"),
        pytest.param(JPEG, "image/jpeg", id="jpeg"),
        pytest.param(WEBP, "image/webp", id="webp"),
        pytest.param(GIF, "image/gif", id="gif"),
        pytest.param(AVIF, "image/avif", id="avif"),
        pytest.param(b"%PDF-1.7 not an image", None, id="pdf"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"RIFF\x00\x00\x00\x00WAVEfmt ", None, id="riff-but-wav"),
    ],
)
def test_sniff_reads_the_magic_not_the_name(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


def store(tmp_path: Path, clock=None) -> AssetStore:
    return AssetStore(tmp_path / "assets", AssetSigner(["k1"], clock=clock or FakeClock()), "http://r.example/")


@pytest.mark.anyio
async def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    assets = store(tmp_path)
    first = await assets.put(PNG)
    digest = hashlib.sha256(PNG).hexdigest()
    assert first == Asset(f"{digest}.png", digest, "image/png", len(PNG))
    assert (tmp_path / "assets" / first.name).read_bytes() == PNG
    assert await assets.put(PNG) == first
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [first.name]  # no temporary files left
    unknown = await assets.put(b"\x00binary")
    assert unknown.name.endswith(".bin") and unknown.media_type == "application/octet-stream"


@pytest.mark.anyio
async def test_urls_are_signed_for_assets_only(tmp_path: Path) -> None:
    clock = FakeClock()
    assets = store(tmp_path, clock)
    asset = await assets.put(JPEG)
    url = assets.url(asset)
    assert url.startswith("http://r.example/assets/") and asset.name not in url
    token = url.rsplit("/", 1)[1]
    found = await assets.resolve(token)
    assert (found.path.name, found.media_type, found.sha256) == (asset.name, "image/jpeg", asset.sha256)
    with pytest.raises(InvalidSignature):
        await assets.resolve(token[:-3] + "abc")
    with pytest.raises(InvalidSignature):  # a callback token never opens an asset
        await assets.resolve(CallbackSigner(["k1"], clock=clock).mint(asset.name, max_age=60))
    with pytest.raises(NotFound):
        await assets.resolve(AssetSigner(["k1"], clock=clock).mint("../secrets.json", max_age=60))
    with pytest.raises(NotFound):
        await assets.resolve(AssetSigner(["k1"], clock=clock).mint("0" * 64 + ".png", max_age=60))
    short = AssetSigner(["k1"], clock=clock).mint(asset.name, max_age=60)
    clock.advance(61)
    with pytest.raises(CallbackExpired) as caught:
        await assets.resolve(short)
    assert caught.value.code == "asset_expired"
    clock.advance(5 * 365 * 86400)
    assert (await assets.resolve(token)).sha256 == asset.sha256  # stored URLs keep working


@pytest.mark.anyio
async def test_inline_images_become_asset_urls(tmp_path: Path) -> None:
    assets = store(tmp_path)
    encoded = base64.b64encode(PNG).decode()
    report = Report(TaskState.SUCCEEDED, images=({"b64_json": encoded, "revised_prompt": "p"},
                                                 {"url": "https://cdn.example/x.png"}))
    kept = await assets.inline_images(report)
    first, second = kept.images
    assert "b64_json" not in first and first["revised_prompt"] == "p"
    assert first["url"] == first["asset_url"] and first["url"].startswith("http://r.example/assets/")
    assert second == {"url": "https://cdn.example/x.png"}
    assert (tmp_path / "assets" / f"{hashlib.sha256(PNG).hexdigest()}.png").exists()
    assert decode_inline("data:image/png;base64," + encoded) == PNG
    with pytest.raises(InvalidPayload):
        await assets.inline_images(Report(TaskState.SUCCEEDED, images=({"b64_json": "not base64!"},)))
    with pytest.raises(InvalidPayload):
        decode_inline(base64.b64encode(b"%PDF-1.7").decode())
    assert without_inline_images({"data": [{"b64_json": encoded}], "n": 1}) == {
        "data": [{"b64_json": f"[{len(encoded)} base64 characters, stored as an asset]"}], "n": 1}


def inline(data: bytes) -> dict[str, str]:
    return {"b64_json": base64.b64encode(data).decode()}


def xhuoapi_success(upstream: str, *images: dict[str, str]) -> dict[str, object]:
    return {"success": True, "task_id": upstream, "trace_id": "t", "data": {"created": 1, "data": list(images)}}


@pytest.mark.anyio
async def test_only_a_callback_that_changes_its_task_writes_inline_images(tmp_path: Path, running: Running) -> None:
    """A leaked callback URL cannot fill the disk: what is refused or ignored writes no file."""
    def stored() -> set[str]:
        folder = tmp_path / "assets"
        return {p.name for p in folder.iterdir()} if folder.exists() else set()

    def png(n: int) -> bytes:  # distinct files, each still a PNG
        return PNG + bytes([n])

    async def mint() -> tuple[str, str]:
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        return minted["task"]["id"], minted["callback_url"]

    task_id, url = await mint()
    refused = [
        xhuoapi_success("up-1", inline(png(1)), {"b64_json": "not base64!"}),  # checked before any is written
        xhuoapi_success("up-1", inline(b"<svg onload=alert(1)>")),  # not an image a kept copy may be
    ]
    for body in refused:
        answer = await running.post_callback(url, body)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_payload", answer.text
    assert stored() == set()

    applied = await running.post_callback(url, xhuoapi_success("up-1", inline(png(2))))
    assert applied.status_code == 200 and "ignored" not in applied.json(), applied.text
    kept = {f"{hashlib.sha256(png(2)).hexdigest()}.png"}
    assert stored() == kept

    ignored = await running.post_callback(url, xhuoapi_success("up-1", inline(png(3))))  # the task is terminal
    assert ignored.status_code == 200 and ignored.json()["ignored"] is True
    mismatch = await running.post_callback(url, xhuoapi_success("up-2", inline(png(4))))
    assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "task_mismatch"
    _, other_url = await mint()
    taken = await running.post_callback(other_url, xhuoapi_success("up-1", inline(png(5))))
    assert taken.status_code == 409 and taken.json()["error"]["details"]["reason"] == "upstream_task_taken"
    assert stored() == kept

    shown = (await running.api.get(f"/v1/tasks/{task_id}")).json()
    assert shown["state"] == "succeeded" and shown["result"]["images"][0]["asset_url"].startswith(running.url)
    logged = (await running.api.get(f"/v1/tasks/{task_id}/callbacks")).json()["data"]
    assert [entry["verdict"] for entry in logged].count("ignored") == 1  # logged all the same


def test_asset_tokens_never_reach_the_logs() -> None:
    assert redact_path("/assets/.eJwNwUEOg.awE5kQ.xp5LGN") == "/assets/[redacted]"
    assert redact_path("see http://r/assets/abc.def?x=1") == "see http://r/assets/[redacted]?x=1"
    assert redact_path("/callbacks/tok/callback") == "/callbacks/[redacted]/callback"


@pytest.mark.anyio
async def test_assets_are_served_with_their_type_and_cached(running: Running, logs) -> None:
    assets = running.ctx.assets
    url = assets.url(await assets.put(PNG))
    async with httpx.AsyncClient() as anonymous:  # the signed URL is the only credential
        served = await anonymous.get(url)
        assert served.status_code == 200 and served.content == PNG
        assert served.headers["content-type"] == "image/png"
        assert "immutable" in served.headers["cache-control"]
        assert served.headers["etag"] == f'"{hashlib.sha256(PNG).hexdigest()}"'
        assert served.headers["x-content-type-options"] == "nosniff"
        again = await anonymous.get(url, headers={"if-none-match": served.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert (await anonymous.head(url)).status_code == 200
        forged = await anonymous.get(url[:-4] + "xxxx")
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_signature"
        token = AssetSigner([str(k) for k in running.settings.secret_keys]).mint("f" * 64 + ".png", max_age=60)
        missing = await anonymous.get(f"{running.url}/assets/{token}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "asset_not_found"
    paths = {event["path"] for event in logs.events("http.request")}
    assert paths == {"/assets/[redacted]"}
