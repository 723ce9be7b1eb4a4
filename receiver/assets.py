"""The asset store: image files the receiver serves itself, named by their content.

    assets = AssetStore(settings.asset_dir, AssetSigner(keys, clock=clock), settings.public_url)
    asset = await assets.put(data)        # data/assets/<sha256>.png, written once, atomically
    url = assets.url(asset)               # {public_url}/assets/{signed token}
    found = await assets.resolve(token)   # for GET /assets/{token}

A provider that answers with image bytes (`b64_json`) has them stored here and
replaced by their URL (`inline_images`), so a task never carries image bytes
and the database never holds them. Mirroring a provider's image URL is the
same `put()` of the downloaded bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.errors import CallbackExpired, InvalidPayload, InvalidSignature, NotFound
from receiver.signing import AssetSigner
from receiver.tasks import Report

#: Asset URLs end up in task results, which are kept: they must outlive them (10 years).
URL_MAX_AGE = 10 * 365 * 86400

EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
}
_UNKNOWN = ("application/octet-stream", "bin")
_MEDIA_TYPES = {ext: media_type for media_type, ext in EXTENSIONS.items()} | {_UNKNOWN[1]: _UNKNOWN[0]}
_NAME = re.compile(r"^([0-9a-f]{64})\.(png|jpg|webp|gif|avif|bin)$")


def sniff(data: bytes) -> str | None:
    """The image type `data` really is, from its first bytes (None: not an image we know).

    >>> sniff(b"\\x89PNG\\r\\n\\x1a\\n...")
    'image/png'
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return None


@dataclass(frozen=True, slots=True)
class Asset:
    """One stored file: `name` is `<sha256>.<ext>`, the extension from the bytes' magic."""

    name: str
    sha256: str
    media_type: str
    size: int

    @classmethod
    def describe(cls, data: bytes) -> Asset:
        digest = hashlib.sha256(data).hexdigest()
        media_type = sniff(data)
        if media_type is None:
            media_type, ext = _UNKNOWN
        else:
            ext = EXTENSIONS[media_type]
        return cls(f"{digest}.{ext}", digest, media_type, len(data))


@dataclass(frozen=True, slots=True)
class Found:
    """An asset a valid token names, ready to serve."""

    path: Path
    media_type: str
    sha256: str


class AssetStore:
    def __init__(self, directory: Path, signer: AssetSigner, public_url: str) -> None:
        self.directory = Path(directory)
        self.signer = signer
        self.public_url = public_url.rstrip("/")

    async def put(self, data: bytes) -> Asset:
        """Store `data` (once: the name is its hash) and describe it.

        Hashing and writing both run off the event loop: an image may be tens of megabytes.
        """
        return await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> Asset:
        asset = Asset.describe(data)
        name = asset.name
        path = self.directory / name
        if path.exists():
            return asset
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{name}.{secrets.token_hex(4)}.tmp"
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)  # readers never see half a file
        return asset

    def unwritable(self) -> str | None:
        """Why files cannot be stored in the directory (None: they can). Blocking: call it off the loop.

        An existing directory is proven by writing and removing a file; a missing one by its
        nearest existing parent (`put` creates the folders).
        """
        directory = self.directory
        if directory.exists():
            if not directory.is_dir():
                return f"{directory} is not a directory"
            try:
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as exc:
                return f"cannot write in {directory}: {exc.strerror or exc}"
            return None
        parent = directory.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{directory} cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{directory} cannot be created: {parent} is not writable"
        return None

    def url(self, asset: Asset) -> str:
        """The signed URL the receiver serves `asset` at."""
        return f"{self.public_url}/assets/{self.signer.mint(asset.name, max_age=URL_MAX_AGE)}"

    async def resolve(self, token: str) -> Found:
        """The file a token names: InvalidSignature, CallbackExpired (`asset_expired`) or NotFound."""
        try:
            name = self.signer.verify(token)
        except CallbackExpired as exc:
            raise CallbackExpired("This asset URL has expired.", code="asset_expired") from exc
        except InvalidSignature as exc:
            raise InvalidSignature("The asset URL's signature is not valid.") from exc
        match = _NAME.match(name)
        path = self.directory / name
        if match is None or not await asyncio.to_thread(path.is_file):
            raise NotFound("No such asset.", code="asset_not_found")
        return Found(path, _MEDIA_TYPES[match.group(2)], match.group(1))

    async def inline_images(self, report: Report) -> Report:
        """`report` with every `b64_json` image stored here and replaced by its URL.

        Raises InvalidPayload if an inline image is not base64 or not an image (PNG, JPEG, WebP,
        GIF, AVIF: what a kept copy may be); every image is checked before any is written.
        """
        if not report.has_inline_images:
            return report
        decoded: list[bytes | None] = []
        for image in report.images:
            encoded = image.get("b64_json")
            decoded.append(await asyncio.to_thread(decode_inline, encoded) if isinstance(encoded, str) else None)
        images = []
        for image, data in zip(report.images, decoded, strict=True):
            if data is None:
                images.append(image)
                continue
            url = self.url(await self.put(data))  # megabytes: hashed and written off the loop
            kept = {k: v for k, v in image.items() if k != "b64_json"}
            images.append({**kept, "url": kept.get("url") or url, "asset_url": url})
        return dataclasses.replace(report, images=tuple(images))


def decode_inline(encoded: str) -> bytes:
    """The image in a `b64_json` value (a `data:` URL prefix is allowed); InvalidPayload if it is not
    base64 or its bytes are not an image `sniff` knows."""
    _, comma, rest = encoded.partition(",")
    text = rest if comma and encoded.startswith("data:") else encoded
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPayload("An inline image (b64_json) is not valid base64.") from exc
    if not data:
        raise InvalidPayload("An inline image (b64_json) is empty.")
    if sniff(data) is None:
        raise InvalidPayload("An inline image (b64_json) is not a PNG, JPEG, WebP, GIF or AVIF image.")
    return data


def without_inline_images(value: Any) -> Any:
    """`value` (a provider's JSON answer) with every `b64_json` string replaced by a short note,
    for the callback log: the bytes live in the asset store, not in the database."""
    if isinstance(value, dict):
        return {
            k: f"[{len(v)} base64 characters, stored as an asset]"
            if k == "b64_json" and isinstance(v, str)
            else without_inline_images(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_inline_images(item) for item in value]
    return value
