"""The OpenAPI 3.1 document served at /openapi.json.

Kept by hand beside the routes (tests check every route appears here); the
schemas say what the handlers really accept, so generated clients and
schemathesis can rely on them.
"""

from __future__ import annotations

from typing import Any

from receiver import __version__
from receiver.providers import CALLBACK_DIALECTS, TASK_PROVIDERS
from receiver.routes.subscriptions import EVENT_FILTERS
from receiver.types import DeliveryStatus, TaskState

JSON = dict[str, Any]


def ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def answer(description: str, schema: JSON | None = None) -> JSON:
    body: JSON = {"description": description}
    if schema is not None:
        body["content"] = {"application/json": {"schema": schema}}
    return body


def errors(*codes: int) -> JSON:
    described = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        403: "Invalid signature (the URL token's, or the provider's own: invalid_provider_signature)",
        404: "Not found",
        409: "Conflict",
        410: "Expired",
        408: "The body did not arrive in time (request_timeout, RECEIVER_BODY_TIMEOUT); the connection is closed",
        413: "Payload too large",
        429: "Too many long-polls and streams open with this key (too_many_streams, RECEIVER_MAX_STREAMS_PER_KEY); "
        "Retry-After says when to try again",
        431: "The request line and headers are too large (request_header_fields_too_large, "
        "RECEIVER_MAX_HEADER_BYTES); the connection is closed",
        502: "The provider refused the task",
        503: "The provider's signing keys cannot be fetched now (provider_keys_unavailable); retry later",
    }
    return {str(code): answer(described[code], ref("Error")) for code in codes}


def json_body(schema: JSON, *, required: bool = True) -> JSON:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def path_param(name: str, description: str) -> JSON:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def query_param(name: str, schema: JSON, description: str) -> JSON:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


SECURED: list[JSON] = [{"bearer": []}]
NULLABLE_STRING = {"type": ["string", "null"]}

SCHEMAS: JSON = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            },
            "task": {"type": "object"},
        },
    },
    "Task": {
        "type": "object",
        "required": ["id", "provider", "state", "sequence", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^tsk_"},
            "provider": {"type": "string"},
            "model": NULLABLE_STRING,
            "state": {"type": "string", "enum": [s.value for s in TaskState]},
            "upstream_task_id": NULLABLE_STRING,
            "request": {"type": "object"},
            "result": {"type": ["object", "null"]},
            "error": {"type": ["object", "null"]},
            "metadata": {"type": "object"},
            "sequence": {"type": "integer", "minimum": 1},
            "notify_url": NULLABLE_STRING,
            "warnings": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "completed_at": {"type": ["string", "null"], "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "TaskList": {
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {"data": {"type": "array", "items": ref("Task")}, "next_cursor": NULLABLE_STRING},
    },
    "SubmitRequest": {
        "type": "object",
        "required": ["provider", "model", "prompt"],
        "properties": {
            "provider": {"type": "string", "examples": ["xhuoapi"]},
            "model": {"type": "string", "examples": ["gpt-image-2"]},
            "prompt": {"type": "string", "minLength": 1},
            "notify_url": {"type": "string", "format": "uri"},
            "metadata": {"type": "object"},
        },
        "additionalProperties": True,
        "description": "Model parameters (size, quality, aspect_ratio, resolution, …) go beside these fields.",
    },
    "Callback": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "task_id": {"type": "string"},
            "received_at": {"type": "string", "format": "date-time"},
            "verdict": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
            "duplicate": {"type": "boolean"},
            "ignored": {"type": "boolean"},
            "reason": NULLABLE_STRING,
            "dialect": NULLABLE_STRING,
            "reported_state": NULLABLE_STRING,
            "provider_signature": {
                "type": ["string", "null"],
                "enum": ["verified", "unchecked", None],
                "description": "Replicate/fal only: verified, or unchecked when no secret is configured.",
            },
            "headers": {"type": "object", "description": "The headers kept (provider signatures, content type, …)."},
            "body": {"description": "The body parsed as JSON (as text when it is not JSON)."},
            "raw_body": {"type": "string", "description": "The body byte for byte as received."},
            "raw_body_encoding": {"type": "string", "enum": ["utf-8", "base64"]},
        },
    },
    "CallbackAck": {
        "type": "object",
        "required": ["ok", "task_id", "duplicate"],
        "properties": {
            "ok": {"type": "boolean"},
            "task_id": {"type": "string"},
            "duplicate": {"type": "boolean"},
            "ignored": {"type": "boolean"},
            "reason": NULLABLE_STRING,
        },
    },
    "SubmitForm": {
        "type": "object",
        "required": ["provider", "model", "prompt"],
        "properties": {
            "provider": {"type": "string", "examples": ["xenodia"]},
            "model": {"type": "string", "examples": ["nano-banana-pro"]},
            "prompt": {"type": "string", "minLength": 1},
            "notify_url": {"type": "string", "format": "uri"},
            "metadata": {"type": "string", "description": "A JSON object, as text."},
            "image_input": {"type": "array", "items": {"type": "string", "format": "uri"}},
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        },
        "additionalProperties": {"type": "string"},
        "description": "The JSON fields as form fields (numbers and booleans typed by the model catalog), "
        "repeated `image_input` URLs, and `image` / `image[]` reference files (JPEG, PNG or WebP, "
        "at most 31,457,280 bytes each).",
    },
    "CallbackUrlRequest": {
        "type": "object",
        "properties": {
            "provider": {"type": "string", "enum": list(CALLBACK_DIALECTS), "default": "auto"},
            "metadata": {"type": "object"},
            "expires_in": {"type": "integer", "minimum": 60, "maximum": 31536000},
        },
    },
    "CallbackUrl": {
        "type": "object",
        "required": ["task", "callback_url"],
        "properties": {"task": ref("Task"), "callback_url": {"type": "string", "format": "uri"}},
    },
}

SCHEMAS.update(
    {
        "Subscription": {
            "type": "object",
            "required": ["id", "url", "events", "enabled", "secret", "created_at", "updated_at"],
            "properties": {
                "id": {"type": "string", "pattern": "^sub_"},
                "url": {"type": "string", "format": "uri"},
                "events": {"type": "array", "items": {"type": "string", "enum": list(EVENT_FILTERS)}},
                "description": NULLABLE_STRING,
                "enabled": {"type": "boolean"},
                "task_id": {**NULLABLE_STRING, "description": "Set for a task's notify_url: that task alone."},
                "disabled_reason": NULLABLE_STRING,
                "failing_since": {"type": ["string", "null"], "format": "date-time"},
                "secret": {
                    "type": "string",
                    "description": "In full (whsec_…) only when created or rotated; masked everywhere else.",
                },
                "previous_secret_expires_at": {"type": ["string", "null"], "format": "date-time"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
            },
        },
        "SubscriptionList": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "array", "items": ref("Subscription")}},
        },
        "SubscriptionCreate": {
            "type": "object",
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "format": "uri", "description": "http(s); never a private address"},
                "events": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "enum": list(EVENT_FILTERS)},
                    "default": ["*"],
                },
                "description": {"type": ["string", "null"], "maxLength": 500},
                "secret": {"type": "string", "pattern": "^whsec_", "description": "base64 of 24 to 64 bytes"},
            },
        },
        "SubscriptionPatch": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "events": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": list(EVENT_FILTERS)}},
                "enabled": {"type": "boolean", "description": "true also clears disabled_reason and failing_since"},
                "description": {"type": ["string", "null"], "maxLength": 500},
            },
        },
        "RotateSecret": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"secret": {"type": "string", "pattern": "^whsec_"}},
        },
        "Recover": {
            "type": "object",
            "required": ["since"],
            "additionalProperties": False,
            "properties": {
                "since": {
                    "oneOf": [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0}],
                    "description": "ISO-8601 time or unix seconds",
                }
            },
        },
        "Attempt": {
            "type": "object",
            "properties": {
                "at": {"type": "string", "format": "date-time"},
                "status_code": {"type": ["integer", "null"]},
                "latency_ms": {"type": "number"},
                "error": NULLABLE_STRING,
                "response_body": {**NULLABLE_STRING, "description": "The first KiB of the answer."},
            },
        },
        "Delivery": {
            "type": "object",
            "required": ["id", "subscription_id", "event_id", "event_type", "status", "attempts"],
            "properties": {
                "id": {"type": "string", "pattern": "^dlv_"},
                "subscription_id": {"type": "string"},
                "task_id": NULLABLE_STRING,
                "event_id": {"type": "string", "description": "The webhook-id header, the same on every attempt."},
                "event_type": {"type": "string"},
                "sequence": {"type": "integer"},
                "status": {"type": "string", "enum": [s.value for s in DeliveryStatus]},
                "attempt_count": {"type": "integer"},
                "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "attempts": {"type": "array", "items": ref("Attempt")},
            },
        },
        "DeliveryList": {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {"data": {"type": "array", "items": ref("Delivery")}, "next_cursor": NULLABLE_STRING},
        },
    }
)

TASK_ID = path_param("task_id", "The task's id (tsk_…).")
SUBSCRIPTION_ID = path_param("subscription_id", "The subscription's id (sub_…).")
DELIVERY_ID = path_param("delivery_id", "The delivery's id (dlv_…).")

#: A callback may be refused for its token, its payload, its size, its pace, or a full callback log.
CALLBACK_ERRORS = errors(400, 403, 404, 408, 409, 410, 413, 503)


PATHS: JSON = {
    "/v1/tasks": {
        "post": {
            "summary": "Submit a task to a provider",
            "operationId": "createTask",
            "security": SECURED,
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ref("SubmitRequest")},
                    "multipart/form-data": {"schema": ref("SubmitForm")},
                },
            },
            "responses": {
                "202": answer(
                    "Accepted by the provider (or, for a synchronous provider, queued for the call)", ref("Task")
                ),
                "200": answer("An idempotent retry: the task the key already names", ref("Task")),
                **errors(400, 401, 409, 413, 502),
            },
        },
        "get": {
            "summary": "List tasks, newest first",
            "operationId": "listTasks",
            "security": SECURED,
            "parameters": [
                query_param("upstream_task_id", {"type": "string"}, "The provider's task id."),
                query_param("state", {"type": "string", "enum": [s.value for s in TaskState]}, "Only this state."),
                query_param("provider", {"type": "string", "enum": list(TASK_PROVIDERS)}, "Only this provider."),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "Page size (20)."),
                query_param("cursor", {"type": "string"}, "next_cursor of the previous page."),
            ],
            "responses": {"200": answer("A page of tasks", ref("TaskList")), **errors(400, 401)},
        },
    },
    "/v1/tasks/{task_id}": {
        "get": {
            "summary": "A task; ?wait=N holds until it is terminal",
            "operationId": "getTask",
            "security": SECURED,
            "parameters": [
                TASK_ID,
                query_param("wait", {"type": "number", "minimum": 0, "maximum": 60}, "Seconds to wait."),
            ],
            "responses": {"200": answer("The task", ref("Task")), **errors(400, 401, 404, 429)},
        }
    },
    "/v1/tasks/{task_id}/callbacks": {
        "get": {
            "summary": "Every callback received for a task",
            "operationId": "listTaskCallbacks",
            "security": SECURED,
            "parameters": [TASK_ID],
            "responses": {
                "200": answer(
                    "The callback log",
                    {"type": "object", "properties": {"data": {"type": "array", "items": ref("Callback")}}},
                ),
                **errors(401, 404),
            },
        }
    },
    "/v1/tasks/{task_id}/cancel": {
        "post": {
            "summary": "Cancel a task that is not terminal",
            "operationId": "cancelTask",
            "security": SECURED,
            "parameters": [TASK_ID],
            "responses": {"200": answer("The cancelled task", ref("Task")), **errors(401, 404, 409)},
        }
    },
    "/v1/tasks/{task_id}/events": {
        "get": {
            "summary": "Server-Sent Events: the task now, then one event per change, ending after a terminal state",
            "operationId": "streamTaskEvents",
            "security": SECURED,
            "parameters": [TASK_ID],
            "responses": {
                "200": {
                    "description": "`id:` the task's sequence, `event:` task.<state>, `data:` the task (JSON)",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **errors(401, 404, 429),
            },
        }
    },
    "/v1/stream": {
        "get": {
            "summary": "Server-Sent Events of every task change, logged callback and delivery attempt (the dashboard)",
            "operationId": "streamActivity",
            "security": SECURED,
            "responses": {
                "200": {
                    "description": "`event: ready` once listening, then `event: task` (`data:` the task), "
                    '`event: callback` and `event: delivery` (`data: {"task_id", "id"}`)',
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **errors(401, 429),
            },
        }
    },
    "/v1/subscriptions": {
        "post": {
            "summary": "Subscribe an endpoint to task events (the secret is shown in full only here)",
            "operationId": "createSubscription",
            "security": SECURED,
            "requestBody": json_body(ref("SubscriptionCreate")),
            "responses": {"201": answer("The subscription, secret in full", ref("Subscription")), **errors(400, 401)},
        },
        "get": {
            "summary": "List subscriptions (secrets masked)",
            "operationId": "listSubscriptions",
            "security": SECURED,
            "responses": {"200": answer("Every subscription", ref("SubscriptionList")), **errors(401)},
        },
    },
    "/v1/subscriptions/{subscription_id}": {
        "get": {
            "summary": "A subscription (secret masked)",
            "operationId": "getSubscription",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "responses": {"200": answer("The subscription", ref("Subscription")), **errors(401, 404)},
        },
        "patch": {
            "summary": "Change the URL, events, description, or enable/disable",
            "operationId": "updateSubscription",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "requestBody": json_body(ref("SubscriptionPatch")),
            "responses": {"200": answer("The subscription", ref("Subscription")), **errors(400, 401, 404)},
        },
        "delete": {
            "summary": "Delete a subscription (its pending deliveries are closed as failed)",
            "operationId": "deleteSubscription",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "responses": {"204": answer("Deleted"), **errors(401, 404)},
        },
    },
    "/v1/subscriptions/{subscription_id}/rotate-secret": {
        "post": {
            "summary": "A new secret (shown in full); the previous one keeps verifying for 24 hours",
            "operationId": "rotateSubscriptionSecret",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "requestBody": json_body(ref("RotateSecret"), required=False),
            "responses": {
                "200": answer("The subscription, new secret in full", ref("Subscription")),
                **errors(400, 401, 404, 409),
            },
        }
    },
    "/v1/subscriptions/{subscription_id}/test": {
        "post": {
            "summary": "Send a ping event to this subscription only",
            "operationId": "testSubscription",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "responses": {"202": answer("Queued"), **errors(401, 404, 409)},
        }
    },
    "/v1/subscriptions/{subscription_id}/recover": {
        "post": {
            "summary": "Send again every failed delivery of this subscription since a time",
            "operationId": "recoverSubscription",
            "security": SECURED,
            "parameters": [SUBSCRIPTION_ID],
            "requestBody": json_body(ref("Recover")),
            "responses": {
                "202": answer(
                    "How many deliveries were queued again",
                    {
                        "type": "object",
                        "properties": {
                            "subscription_id": {"type": "string"},
                            "since": {"type": "string", "format": "date-time"},
                            "recovered": {"type": "integer"},
                        },
                    },
                ),
                **errors(400, 401, 404, 409),
            },
        }
    },
    "/v1/deliveries": {
        "get": {
            "summary": "The delivery log, newest first, each delivery with its attempts",
            "operationId": "listDeliveries",
            "security": SECURED,
            "parameters": [
                query_param("subscription_id", {"type": "string"}, "Only this subscription."),
                query_param("task_id", {"type": "string"}, "Only this task."),
                query_param(
                    "status", {"type": "string", "enum": [s.value for s in DeliveryStatus]}, "Only this status."
                ),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "Page size (50)."),
                query_param("cursor", {"type": "string"}, "next_cursor of the previous page."),
            ],
            "responses": {"200": answer("A page of deliveries", ref("DeliveryList")), **errors(400, 401)},
        }
    },
    "/v1/deliveries/{delivery_id}": {
        "get": {
            "summary": "A delivery with its attempts",
            "operationId": "getDelivery",
            "security": SECURED,
            "parameters": [DELIVERY_ID],
            "responses": {"200": answer("The delivery", ref("Delivery")), **errors(401, 404)},
        }
    },
    "/v1/deliveries/{delivery_id}/retry": {
        "post": {
            "summary": "Send a delivery that ended (failed or succeeded) again now, same webhook-id",
            "operationId": "retryDelivery",
            "security": SECURED,
            "parameters": [DELIVERY_ID],
            "responses": {"202": answer("Pending again", ref("Delivery")), **errors(401, 404, 409)},
        }
    },
    "/v1/callback-urls": {
        "post": {
            "summary": "Mint a task and its signed callback URL for a task submitted elsewhere",
            "operationId": "createCallbackUrl",
            "security": SECURED,
            "requestBody": json_body(ref("CallbackUrlRequest"), required=False),
            "responses": {"201": answer("The task and its URL", ref("CallbackUrl")), **errors(400, 401)},
        }
    },
    "/callbacks/{token}": {
        "post": {
            "summary": "A provider's callback (authorised by the signed URL alone; a trailing slash is taken too)",
            "operationId": "receiveCallback",
            "parameters": [path_param("token", "The signed token from the callback URL.")],
            "requestBody": json_body({"type": "object"}),
            "responses": {"200": answer("Stored", ref("CallbackAck")), **CALLBACK_ERRORS},
        }
    },
    "/callbacks/{token}/callback": {
        "post": {
            "summary": "The same, for providers that append /callback to the URL",
            "operationId": "receiveCallbackSuffixed",
            "parameters": [path_param("token", "The signed token from the callback URL.")],
            "requestBody": json_body({"type": "object"}),
            "responses": {"200": answer("Stored", ref("CallbackAck")), **CALLBACK_ERRORS},
        }
    },
    "/assets/{token}": {
        "get": {
            "summary": "An image the receiver stored (authorised by the signed URL alone; cached for good)",
            "operationId": "getAsset",
            "parameters": [path_param("token", "The signed token from the asset URL.")],
            "responses": {
                "200": {"description": "The image", "content": {"image/*": {}}},
                "304": {"description": "Not modified (If-None-Match)"},
                **errors(403, 404, 410),
            },
        }
    },
    "/healthz": {"get": {"summary": "Liveness", "operationId": "healthz", "responses": {"200": answer("Running")}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: the database answers and migrations are current",
            "operationId": "readyz",
            "responses": {
                "200": answer('Ready: {"status": "ready"}'),
                "503": answer("Not ready (not_ready; also `status: unavailable` and the `reason`)", ref("Error")),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {"200": {"description": "Exposition text", "content": {"text/plain": {}}}},
        }
    },
    "/ui": {
        "get": {
            "summary": "The dashboard (no key needed for the page; it asks for one and sends it as a bearer header)",
            "operationId": "dashboard",
            "responses": {"200": {"description": "The page", "content": {"text/html": {}}}},
        }
    },
    "/ui/app.js": {
        "get": {
            "summary": "The dashboard's script",
            "operationId": "dashboardScript",
            "responses": {"200": {"description": "JavaScript", "content": {"text/javascript": {}}}},
        }
    },
    "/ui/app.css": {
        "get": {
            "summary": "The dashboard's style sheet",
            "operationId": "dashboardStyles",
            "responses": {"200": {"description": "CSS", "content": {"text/css": {}}}},
        }
    },
    "/ui/favicon.svg": {
        "get": {
            "summary": "The dashboard's icon",
            "operationId": "dashboardIcon",
            "responses": {"200": {"description": "SVG", "content": {"image/svg+xml": {}}}},
        }
    },
    "/openapi.json": {
        "get": {"summary": "This document", "operationId": "openapi", "responses": {"200": answer("OpenAPI")}}
    },
}


def _with_server_limits(paths: JSON) -> JSON:
    """Every operation may be answered 431 (an oversized head), and one that takes a body 408 (a body
    sent too slowly): the server's limits (receiver.protocol), before any route runs."""
    limited: JSON = {}
    for path, operations in paths.items():
        limited[path] = {}
        for method, operation in operations.items():
            codes = (408, 431) if method in ("post", "put", "patch") else (431,)
            extra = {code: value for code, value in errors(*codes).items() if code not in operation["responses"]}
            limited[path][method] = {**operation, "responses": {**operation["responses"], **extra}}
    return limited


def document(server_url: str) -> JSON:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": __version__,
            "description": "A webhook callback receiver for asynchronous image-generation APIs.",
        },
        "servers": [{"url": server_url}],
        "paths": _with_server_limits(PATHS),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
