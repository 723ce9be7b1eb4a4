"""Taking a callback in: token, dialect, provider signature, then one durable transaction.

    applied = await ingest(ctx, ctx.signer.open(token), body, headers)

The token names the task and its callback dialect, so everything but the
write happens before the database is touched, and the write is one store
operation (load the task, detect duplicates, decide, log, outbox) that commits
before the answer: a 200 always means the callback is on disk. Providers that
sign their callbacks (Replicate, fal) are checked twice: the URL token, then
their own signature (`ctx.signatures`), as soon as the dialect is known —
before the payload is trusted, and for `auto` tasks right after detection. A
task whose provider is known refuses a payload of another dialect
(`apply_report`), so an `auto` task that learned its provider from a signed
callback never takes an unsigned one afterwards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import orjson

from receiver.assets import without_inline_images
from receiver.context import Context
from receiver.errors import InvalidPayload, NotFound, TaskMismatch
from receiver.ids import new_id
from receiver.logs import get_logger
from receiver.mirror import marked
from receiver.nesting import MAX_DEPTH, too_deep
from receiver.providers import dialect_for
from receiver.providers.base import Answer
from receiver.providers.signatures import SignatureCheck
from receiver.signing import Claims
from receiver.store.base import CREDENTIAL_WORDS, Applied, IncomingCallback, TaskQuery
from receiver.tasks import Report, Task, apply_report
from receiver.types import JSON, TaskState

log = get_logger("receiver.callbacks")

#: The most images one result may carry (providers make 1 to 10 per task): each is downloaded and
#: kept, so a callback URL cannot be made to fetch and store thousands.
MAX_IMAGES = 16
#: Marks a callback-log entry the receiver fetched itself: "poll" or "sync-response".
SOURCE_HEADER = "x-receiver-source"
_CREDENTIAL = re.compile("|".join(map(re.escape, CREDENTIAL_WORDS)))


async def load_task(ctx: Context, task_id: str) -> Task:
    task = await ctx.store.get_task(task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    return task


def parse_payload(body: bytes) -> JSON:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload("The callback body is not valid JSON.") from exc
    if not isinstance(payload, dict):
        raise InvalidPayload("The callback body must be a JSON object.")
    if too_deep(payload, source=body):
        raise InvalidPayload(f"The callback body nests more than {MAX_DEPTH} levels.", details={"limit": MAX_DEPTH})
    return payload


async def ingest(ctx: Context, claims: Claims, body: bytes, headers: Mapping[str, str]) -> Applied:
    """Verify, parse and durably record one callback for the task `claims` names."""
    task_id = claims.subject
    named = claims.scope
    if named is None or named == "auto":
        # Tokens minted before they carried the dialect, and `auto` tasks, which keep the dialect
        # their first callback was written in (detection is for the first): ask the task (one read).
        named = (await load_task(ctx, task_id)).provider
    signature = None
    if named in ctx.signatures:  # the dialect is known and signs: check before reading the body
        signature = await ctx.signatures.check(named, body, headers, task_id=task_id)
    payload = parse_payload(body)
    dialect = dialect_for(named, payload)
    if named == "auto" and dialect.name in ctx.signatures:  # the payload named a signing dialect
        signature = await ctx.signatures.check(dialect.name, body, headers, task_id=task_id)
    report = dialect.parse(payload)
    if signature is SignatureCheck.UNCHECKED:
        report = report.with_warning(ctx.signatures.warning(dialect.name))
    kept = kept_headers(headers)
    # A leaked callback URL cannot fill the database: at most so many callbacks kept per task (later
    # ones are still applied and answered, not kept).
    limit = ctx.settings.max_callbacks_per_task
    return await record(ctx, task_id, body, kept, report, signature=signature, max_callbacks=limit)


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a callback's log entry keeps: all but credentials (names with a
    `CREDENTIAL_WORDS` word) and the receiver's own mark (`x-receiver-source`), which only what it
    fetched itself carries. A header sent more than once keeps its values joined by commas, as HTTP
    reads them."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key == SOURCE_HEADER or _CREDENTIAL.search(key):
            continue
        kept[key] = f"{kept[key]}, {value}" if key in kept else value
    return kept


async def record(
    ctx: Context,
    task_id: str,
    body: bytes,
    headers: Mapping[str, str],
    report: Report,
    *,
    signature: SignatureCheck | None = None,
    max_callbacks: int | None = None,
) -> Applied:
    """Log `body` in the task's callback log and apply `report`, in one transaction.

    Every result takes this path, pushed (a callback), pulled (a poll) or answered (a synchronous
    call); inline images (`b64_json`) are moved to the asset store first, so a task never holds
    image bytes; a success's images are then kept before it is announced (receiver.mirror).
    `headers` name the source (`x-receiver-source`) of what was not a callback;
    `signature` is how a callback's provider signature was checked; `max_callbacks` caps the
    task's callback log: past it a callback is still applied and answered, but not kept (callbacks
    from outside only: what the receiver fetched itself is always kept).
    """
    if len(report.images) > MAX_IMAGES:  # each may be downloaded and kept: a bound on what one result costs
        raise InvalidPayload(
            f"A result has at most {MAX_IMAGES} images; this one has {len(report.images)}.",
            details={"limit": MAX_IMAGES},
        )
    if report.has_inline_images:
        report = await keep_inline_images(ctx, task_id, report)
    if report.state is TaskState.SUCCEEDED:
        report = marked(ctx.settings, report)  # its event waits until the images are kept
    callback = IncomingCallback(
        id=new_id("cb", ctx.clock),
        task_id=task_id,
        received_at=ctx.clock(),
        body=body,
        headers=dict(headers),
        body_sha256=hashlib.sha256(body).hexdigest(),
        provider_signature=signature.value if signature is not None else None,
    )
    applied = await ctx.store.record_callback(callback, report, max_callbacks=max_callbacks)
    if not applied.logged:
        log.warning("callback.not_logged", task_id=task_id, callback_id=callback.id, limit=max_callbacks)
    log.info(
        "callback.recorded",
        task_id=task_id,
        callback_id=callback.id,
        verdict=applied.verdict.value,
        reason=applied.transition.reason,
        state=applied.task.state.value,
        dialect=report.dialect,
        check=signature.value if signature is not None else None,
        source=headers.get(SOURCE_HEADER, "callback"),
    )
    return applied


async def keep_inline_images(ctx: Context, task_id: str, report: Report) -> Report:
    """`report` with its inline images (`b64_json`) written to the asset store, if it would change
    the task; the bytes dropped (a note left) if it would be ignored; refused if it would be.

    Files are written before the transaction that refers to them (an acknowledged result never
    points at a file that is not there), so the decision is taken here first on the task as it is
    now, as the store will take it again: a callback that is refused or changes nothing writes no
    file, and a leaked callback URL cannot fill the disk with images nothing refers to. What can
    still write a file that ends up unused is a result racing another for the same task.
    """
    task = await load_task(ctx, task_id)
    new = apply_report(task, report, now=ctx.clock()).task  # raises what the store would raise
    if new is None or new.state is not TaskState.SUCCEEDED:
        return report.replace(images=tuple(without_inline_images(image) for image in report.images))
    named = new.upstream_task_id
    if named is not None and named != task.upstream_task_id:  # the task would learn it: is it free?
        holders = await ctx.store.list_tasks(TaskQuery(upstream_task_id=named, provider=new.provider, limit=2))
        if any(holder.id != task.id for holder in holders):
            raise TaskMismatch(task.id, task.upstream_task_id, named, taken=True)
    return await ctx.assets.inline_images(report)


async def record_answer(ctx: Context, task_id: str, answer: Answer, source: str, report: Report) -> Applied:
    """`record` an answer the receiver fetched itself (a poll, a synchronous call), logged like a
    callback with `x-receiver-source: <source>`."""
    headers = {"content-type": answer.content_type or "application/json", SOURCE_HEADER: source}
    return await record(ctx, task_id, logged_body(answer), headers, report)


def logged_body(answer: Answer) -> bytes:
    """What the callback log keeps of an answer the receiver fetched: the body as received, but
    inline images (`b64_json`) reduced to a note, since their bytes go to the asset store."""
    stripped = without_inline_images(answer.payload)
    return answer.body if stripped == answer.payload else orjson.dumps(stripped)
