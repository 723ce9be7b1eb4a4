"""Reading a multipart/form-data submission: text fields typed by the catalog, reference files kept.

    body, uploads, problems = await read_submission_form(request, limit=settings.max_upload_bytes)

The body is counted while it streams in and refused (413) the moment it passes
`limit`, so an upload never fills memory or disk beyond it; files above 1 MiB
spool to a temporary file while the form is parsed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from receiver.errors import InvalidRequest, PayloadTooLarge
from receiver.providers.base import Upload
from receiver.providers.catalog import form_body
from receiver.types import JSON

MAX_FILES = 64
MAX_FIELDS = 256
MAX_FIELD_BYTES = 1 << 20


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"


async def read_submission_form(request: Request, limit: int) -> tuple[JSON, list[Upload], list[dict[str, str]]]:
    """The submission in a multipart body: (fields as a JSON body, files, problems found reading it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The upload is larger than {limit} bytes.", details={"limit": limit})
    try:
        async with aclosing(_limited(request, limit)) as stream:
            parser = _StrictParser(
                request.headers, stream, max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
            )
            form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"The multipart body cannot be read: {exc.message}") from exc
    try:
        fields: list[tuple[str, str]] = []
        uploads: list[Upload] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                content_type = value.content_type or "application/octet-stream"
                uploads.append(Upload(name, value.filename or "upload", content_type, data))
            else:
                fields.append((name, value))
    finally:
        await form.close()
    body, problems = form_body(fields)
    return body, uploads, problems


class _StrictParser(MultiPartParser):
    """Text fields must be text in the form's charset (UTF-8 unless the form names another):
    Starlette reads bytes that do not decode as Latin-1, which would send a garbled prompt upstream."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError) as exc:
                raise MultiPartException(f"the field '{part.field_name}' is not {self._charset} text") from exc
        super().on_part_end()


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The upload is larger than {limit} bytes.", details={"limit": limit})
        yield chunk
