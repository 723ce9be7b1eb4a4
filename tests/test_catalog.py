"""The model catalog: every rule, refused before any upstream call, one named case each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from receiver.assets import sniff
from receiver.errors import InvalidParameters
from receiver.fakes.provider import PNG, FakeProvider
from receiver.providers.base import Upload
from receiver.providers.catalog import catalog, form_body, validate
from receiver.server import serve_in_background
from tests.conftest import Running, start_receiver

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64
GIF = b"GIF89a" + b"\x00" * 64
PDF = b"%PDF-1.7\n" + b"\x00" * 64
MAX_BYTES = 31_457_280

XH_GPT = {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "a red apple"}
XH_DALLE = {"provider": "xhuoapi", "model": "dall-e-3", "prompt": "a red apple"}
XE_GPT = {"provider": "xenodia", "model": "gpt-image-2", "prompt": "a red apple"}
XE_NBP = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "a red apple"}
ROUTER = {"provider": "router", "model": "openai/gpt-image-1", "prompt": "a red apple"}


def urls(count: int) -> list[str]:
    return [f"https://cdn.example/ref-{i}.png" for i in range(count)]


def png(count: int, field: str = "image") -> list[tuple[str, str, bytes, str]]:
    return [(field, f"ref-{i}.png", PNG, "image/png") for i in range(count)]


Files = list[tuple[str, str, bytes, str]]  # (field, filename, bytes, declared type)

RULES = [
    # --- every provider ---------------------------------------------------------------------------
    pytest.param({**XH_GPT, "provider": "acme"}, [], "provider", id="unknown-provider"),
    pytest.param({**XH_GPT, "model": "gpt-image-9"}, [], "model", id="model-not-offered"),
    pytest.param({**XH_GPT, "prompt": "  "}, [], "prompt", id="blank-prompt"),
    pytest.param({**XH_GPT, "colour": "red"}, [], "colour", id="unknown-parameter"),
    pytest.param({**XH_GPT, "metadata": [1]}, [], "metadata", id="metadata-not-object"),
    pytest.param({**XH_GPT, "notify_url": 7}, [], "notify_url", id="notify-url-not-string"),
    # --- xhuoapi --------------------------------------------------------------------------------
    pytest.param({**XH_GPT, "n": "1"}, [], "n", id="n-not-integer"),
    pytest.param({**XH_GPT, "model": "nano-banana", "n": 0}, [], "n", id="n-below-1"),
    pytest.param({**XH_GPT, "n": 2}, [], "n", id="gpt-image-2-n-2"),
    pytest.param({**XH_GPT, "size": "large"}, [], "size", id="size-not-wxh"),
    pytest.param({**XH_GPT, "size": ""}, [], "size", id="size-empty"),
    pytest.param({**XH_GPT, "size": "1000x1000"}, [], "size", id="size-not-multiple-of-16"),
    # The provider's own 1K output sizes: its document says they may be reused, the contract's
    # multiple-of-16 rule refuses them (README, "Decisions").
    pytest.param({**XH_GPT, "size": "1254x1254"}, [], "size", id="size-1k-output-square"),
    pytest.param({**XH_GPT, "size": "941x1672"}, [], "size", id="size-1k-output-tall"),
    pytest.param({**XH_GPT, "size": "1024x1024\n"}, [], "size", id="size-trailing-newline"),
    pytest.param({**XH_GPT, "size": "4096x1024"}, [], "size", id="size-side-over-3840"),
    pytest.param({**XH_GPT, "size": "3840x2560"}, [], "size", id="size-over-8294400-pixels"),
    pytest.param({**XH_DALLE, "size": "512x512"}, [], "size", id="dall-e-3-size"),
    pytest.param({**XH_DALLE, "quality": "ultra"}, [], "quality", id="dall-e-3-quality"),
    pytest.param({**XH_DALLE, "style": "baroque"}, [], "style", id="dall-e-3-style"),
    pytest.param({**XH_DALLE, "n": 2}, [], "n", id="dall-e-3-n-2"),
    pytest.param({**XH_GPT, "model": "nano-banana-pro", "n": 4}, [], "n", id="nano-banana-pro-n-4-on-xhuoapi"),
    pytest.param(XH_GPT, png(1), "image", id="files-to-xhuoapi"),
    # --- xenodia gpt-image-2 ---------------------------------------------------------------------
    pytest.param({**XE_GPT, "aspect_ratio": "2:1"}, [], "aspect_ratio", id="gpt-image-2-aspect-ratio"),
    pytest.param({**XE_GPT, "resolution": "8K"}, [], "resolution", id="resolution-8k"),
    pytest.param({**XE_GPT, "aspect_ratio": "auto", "resolution": "2K"}, [], "resolution", id="auto-with-2k"),
    pytest.param({**XE_GPT, "aspect_ratio": "auto", "resolution": "4K"}, [], "resolution", id="auto-with-4k"),
    pytest.param({**XE_GPT, "aspect_ratio": "1:1", "resolution": "4K"}, [], "resolution", id="square-with-4k"),
    pytest.param({**XE_GPT, "output_format": "png"}, [], "output_format", id="gpt-image-2-output-format"),
    pytest.param({**XE_GPT, "n": 2}, [], "n", id="xenodia-gpt-image-2-n-2"),
    pytest.param({**XE_GPT, "image_input": urls(17)}, [], "image_input", id="gpt-image-2-17-references"),
    pytest.param({**XE_GPT, "image_input": urls(10)}, png(7), "image_input", id="gpt-image-2-10-urls-7-files"),
    pytest.param({**XE_GPT, "image_input": "https://cdn.example/a.png"}, [], "image_input",
                 id="image-input-not-a-list"),
    pytest.param({**XE_GPT, "image_input": ["ftp://cdn.example/a.png"]}, [], "image_input",
                 id="image-input-not-http"),
    pytest.param({**XE_GPT, "image_input": ["http://[::1"]}, [], "image_input", id="image-input-unclosed-ipv6-host"),
    # --- xenodia nano-banana-pro -----------------------------------------------------------------
    pytest.param({**XE_NBP, "output_format": "webp"}, [], "output_format", id="nano-banana-pro-webp"),
    pytest.param({**XE_NBP, "resolution": "1080p"}, [], "resolution", id="nano-banana-pro-resolution"),
    pytest.param({**XE_NBP, "aspect_ratio": "wide"}, [], "aspect_ratio", id="nano-banana-pro-aspect-ratio"),
    pytest.param({**XE_NBP, "aspect_ratio": "16:9\n"}, [], "aspect_ratio", id="aspect-ratio-trailing-newline"),
    pytest.param({**XE_NBP, "n": 2}, [], "n", id="nano-banana-pro-n-2"),
    pytest.param({**XE_NBP, "image_input": urls(9)}, [], "image_input", id="nano-banana-pro-9-references"),
    pytest.param(XE_NBP, png(9, "image[]"), "image[]", id="nano-banana-pro-9-files"),
    # --- reference files ---------------------------------------------------------------------------
    pytest.param(XE_NBP, [("image", "ref.gif", GIF, "image/gif")], "image", id="reference-gif"),
    pytest.param(XE_NBP, [("image", "ref.png", PDF, "image/png")], "image", id="reference-lies-about-its-type"),
    pytest.param(XE_NBP, [("image", "big.png", PNG + b"\x00" * (MAX_BYTES - len(PNG) + 1), "image/png")],
                 "image", id="reference-over-31457280-bytes"),
    pytest.param(XE_NBP, [("mask", "m.png", PNG, "image/png")], "mask", id="file-in-an-unknown-field"),
    # --- router ------------------------------------------------------------------------------------
    pytest.param({**ROUTER, "model": "no spaces please"}, [], "model", id="router-model-name"),
    pytest.param({**ROUTER, "n": 11}, [], "n", id="router-n-over-10"),
    pytest.param({**ROUTER, "output_compression": 101}, [], "output_compression", id="router-compression-101"),
    pytest.param({**ROUTER, "output_format": "gif"}, [], "output_format", id="router-output-format"),
    pytest.param({**ROUTER, "background": "blurred"}, [], "background", id="router-background"),
    pytest.param({**ROUTER, "background": "transparent", "output_format": "jpeg"}, [], "background",
                 id="transparent-with-jpeg"),
    pytest.param({**ROUTER, "size": "2K", "resolution": "4K"}, [], "size", id="size-and-another-resolution"),
    pytest.param({**ROUTER, "size": "2048x1152", "aspect_ratio": "1:1"}, [], "size", id="size-and-another-ratio"),
    pytest.param({**ROUTER, "size": "huge"}, [], "size", id="router-size"),
    pytest.param({**ROUTER, "size": "0x0"}, [], "size", id="router-size-zero"),
    pytest.param({**ROUTER, "size": "99999999999999999999x1"}, [], "size", id="router-size-absurd"),
    pytest.param({**ROUTER, "aspect_ratio": "0:0"}, [], "aspect_ratio", id="router-aspect-ratio-zero"),
    pytest.param({**XE_NBP, "aspect_ratio": "0:9"}, [], "aspect_ratio", id="nano-banana-pro-aspect-ratio-zero"),
    pytest.param({**XH_GPT, "size": "016x016"}, [], "size", id="size-leading-zeros"),
    pytest.param({**ROUTER, "aspect_ratio": "square"}, [], "aspect_ratio", id="router-aspect-ratio"),
    pytest.param({**ROUTER, "resolution": "3K"}, [], "resolution", id="router-resolution"),
    pytest.param({**ROUTER, "input_references": ["/etc/x"]}, [], "input_references", id="router-reference-path"),
    pytest.param({**ROUTER, "input_references": ["https://[zz]/a.png"]}, [], "input_references",
                 id="router-reference-bad-ipv6-host"),
    pytest.param({**ROUTER, "seed": 1.5}, [], "seed", id="router-seed-not-integer"),
    pytest.param({**ROUTER, "stream": True}, [], "stream", id="router-stream"),
    pytest.param({**ROUTER, "provider_options": "openai"}, [], "provider_options", id="router-provider-options"),
    pytest.param(ROUTER, png(1), "image", id="files-to-router"),
]


def as_form(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, list) else str(v) for k, v in body.items()}


async def post(running: Running, body: dict[str, Any], files: Files) -> httpx.Response:
    if not files:
        return await running.api.post("/v1/tasks", json=body)
    parts = [(field, (name, data, declared)) for field, name, data, declared in files]
    return await running.api.post("/v1/tasks", data=as_form(body), files=parts)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Running, FakeProvider]]:
    """One receiver and fake provider for the whole table (every case is refused, so none sees another)."""
    fake = FakeProvider(delay=0.05)
    async with serve_in_background(fake.app) as url, start_receiver(
        tmp_path_factory.mktemp("catalog"), provider_url=url
    ) as running:
        yield running, fake


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "files", "field"), RULES)
async def test_every_rule_is_checked_before_any_upstream_call(
    shared: tuple[Running, FakeProvider], body: dict[str, Any], files: Files, field: str
) -> None:
    running, fake = shared
    answer = await post(running, body, files)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_parameters"
    assert [f["field"] for f in error["details"]["fields"]] == [field], error
    assert all(f["message"] for f in error["details"]["fields"])
    assert fake.requests == []  # nothing was sent upstream
    assert (await running.api.get("/v1/tasks")).json()["data"] == []  # and nothing was stored


@pytest.mark.anyio
async def test_every_offending_field_is_reported_at_once(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    body = {**XE_GPT, "aspect_ratio": "auto", "resolution": "4K", "output_format": "png", "n": 3,
            "image_input": urls(16), "colour": "red"}
    answer = await post(running, body, [("image", "x.gif", GIF, "image/gif"), *png(1)])
    fields = {f["field"]: f["message"] for f in answer.json()["error"]["details"]["fields"]}
    assert set(fields) == {"resolution", "output_format", "n", "image_input", "colour", "image"}
    assert "17" in fields["image_input"] and "'x.gif' is image/gif" in fields["image"]
    assert fake.requests == []



@pytest.mark.anyio
@pytest.mark.parametrize("depth", [65, 300])
async def test_a_form_field_nested_past_the_json_limit_is_refused(running: Running, fake_provider, depth: int) -> None:
    """A JSON field of a multipart form is held to the same 64 levels as a JSON body (300 levels
    answered 500 when the task was stored; 65 were stored)."""
    fake, _ = fake_provider
    deep = "[" * depth + "]" * depth
    answer = await post(running, {**XE_NBP, "metadata": '{"a": ' + deep + "}"}, png(1))
    assert answer.status_code == 400, answer.text
    fields = answer.json()["error"]["details"]["fields"]
    assert fields == [{"field": "metadata", "message": "nests more than 64 levels"}]
    assert fake.requests == [] and (await running.api.get("/v1/tasks")).json()["data"] == []

ACCEPTED = [
    pytest.param({**XE_GPT, "aspect_ratio": "auto", "resolution": "1K"}, 0, id="auto-with-1k"),
    pytest.param({**XE_GPT, "aspect_ratio": "auto"}, 0, id="auto-without-resolution"),
    pytest.param({**XE_GPT, "aspect_ratio": "1:1", "resolution": "2K"}, 0, id="square-with-2k"),
    pytest.param({**XE_GPT, "aspect_ratio": "16:9", "resolution": "4K", "n": 1}, 0, id="wide-with-4k"),
    pytest.param({**XE_GPT, "image_input": urls(10)}, 6, id="gpt-image-2-16-references"),
    pytest.param({**XE_NBP, "output_format": "jpg", "aspect_ratio": "21:9", "image_input": urls(4)}, 4,
                 id="nano-banana-pro-8-references"),
    pytest.param({**XH_GPT, "size": "auto"}, 0, id="size-auto"),
    # The router refuses only a size that conflicts with resolution or aspect_ratio (seed 003).
    pytest.param({**ROUTER, "size": "2K", "resolution": "2K", "aspect_ratio": "16:9"}, 0, id="router-size-agrees"),
    pytest.param({**ROUTER, "size": "2048x2048", "aspect_ratio": "1:1"}, 0, id="router-pixels-agree"),
    pytest.param({**ROUTER, "size": "1792x1024", "aspect_ratio": "16:9"}, 0, id="router-pixels-near-ratio"),
    pytest.param({**ROUTER, "size": "2048x1152", "resolution": "1K"}, 0, id="router-pixels-and-tier-left-to-it"),
    pytest.param({**XH_GPT, "size": "3840x2160"}, 0, id="size-at-the-pixel-limit"),
    pytest.param({**XH_GPT, "size": "2160x3840", "quality": "high"}, 0, id="size-tall-4k"),
    pytest.param({**XH_DALLE, "size": "1792x1024", "quality": "hd", "style": "natural", "n": 1}, 0,
                 id="dall-e-3-everything"),
    pytest.param({**ROUTER, "n": 4, "seed": 7, "background": "transparent", "output_format": "webp",
                  "input_references": ["data:image/png;base64,AAAA"], "provider_options": {"order": ["openai"]}}, 0,
                 id="router-everything"),
    pytest.param({**ROUTER, "model": "google/gemini-2.5-flash-image", "resolution": "2K", "aspect_ratio": "16:9"},
                 0, id="router-free-model-name"),
]


@pytest.mark.parametrize(("body", "files"), ACCEPTED)
def test_valid_requests_pass_untouched(body: dict[str, Any], files: int) -> None:
    request = validate(body, [Upload("image", f"r{i}.png", "image/png", PNG) for i in range(files)])
    own = {"provider", "model", "prompt"}
    assert request.params == {k: v for k, v in body.items() if k not in own} and request.warnings == ()
    assert len(request.uploads) == files


@pytest.mark.parametrize("model", ["nano-banana", "nano-banana-2", "nano-banana-pro"])
def test_parameters_a_model_ignores_are_dropped_with_a_warning(model: str) -> None:
    request = validate({**XH_GPT, "model": model, "size": "1792x1024", "quality": "hd", "style": "vivid", "n": 1})
    assert request.params == {"size": "1792x1024"} and request.request() == {"prompt": "a red apple",
                                                                           "size": "1792x1024"}
    assert len(request.warnings) == 3 and all("dropped" in w for w in request.warnings)
    assert {w.split("'")[1] for w in request.warnings} == {"quality", "style", "n"}
    # Parameters xhuoapi itself does not take are dropped too (DESIGN: "others are dropped"; seed 004:
    # "these will be ignored if provided"), never refused.
    others = {"output_format": "png", "aspect_ratio": "1:1", "resolution": "4K", "background": "transparent",
              "response_format": "b64_json", "image_input": ["https://cdn.example/ref.png"]}
    request = validate({**XH_GPT, "model": model, **others})
    assert request.params == {} and {w.split("'")[1] for w in request.warnings} == set(others)


@pytest.mark.anyio
async def test_dropped_parameters_are_warned_on_the_task(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    answer = await running.api.post("/v1/tasks", json={**XH_GPT, "model": "nano-banana", "style": "vivid"})
    assert answer.status_code == 202
    task = answer.json()
    assert task["request"] == {"prompt": "a red apple"} and len(task["warnings"]) == 1
    assert "style" not in fake.requests[-1]["json"]


def test_upload_types_are_corrected_from_the_bytes() -> None:
    request = validate(XE_NBP, [Upload("image", "photo.bin", "application/octet-stream", JPEG)])
    assert request.uploads[0].content_type == "image/jpeg" and sniff(request.uploads[0].data) == "image/jpeg"


def test_form_fields_are_typed_by_the_catalog() -> None:
    body, problems = form_body([
        ("provider", "router"), ("model", "openai/gpt-image-1"), ("prompt", "p"), ("n", "2"), ("seed", "x"),
        ("stream", "false"), ("provider_options", "1"), ("metadata", '{"order": 1}'),
        ("input_references[]", "https://a/1.png"), ("input_references[]", "https://a/2.png"),
    ])
    assert body == {"provider": "router", "model": "openai/gpt-image-1", "prompt": "p", "n": 2, "seed": "x",
                    "stream": False, "provider_options": "1", "metadata": {"order": 1},
                    "input_references": ["https://a/1.png", "https://a/2.png"]}
    assert problems == []
    with pytest.raises(InvalidParameters) as caught:
        validate(body)
    assert {f["field"] for f in caught.value.fields} == {"seed", "provider_options"}

    xenodia, _ = form_body([("provider", "xenodia"), ("model", "nano-banana-pro"), ("prompt", "p"),
                            ("image_input", "https://a/1.png")])
    assert xenodia["image_input"] == ["https://a/1.png"]  # one URL is still a list
    twice, problems = form_body([("provider", "xenodia"), ("prompt", "a"), ("prompt", "b")])
    assert "prompt" not in twice and problems == [{"field": "prompt", "message": "is given more than once"}]


def test_the_catalog_takes_free_form_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {**catalog()["providers"], "acme": {"model_pattern": "acme/[a-z]+", "passthrough": True,
                                                  "params": {"steps": "integer"}}}
    monkeypatch.setitem(catalog(), "providers", entries)
    request = validate({"provider": "acme", "model": "acme/flux", "prompt": "p", "steps": 4, "go_fast": True})
    assert request.params == {"steps": 4, "go_fast": True}
    with pytest.raises(InvalidParameters) as caught:
        validate({"provider": "acme", "model": "acme/Flux!", "prompt": "p", "steps": "4"})
    assert {f["field"] for f in caught.value.fields} == {"model", "steps"}
