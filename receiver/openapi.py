"""The OpenAPI 3.1 document served at /openapi.json.

Kept by hand beside the routes (tests check every route appears here); the
schemas say what the handlers really accept, so generated clients and
schemathesis can rely on them.
"""

from __future__ import annotations

from typing import Any

from receiver import __version__
from receiver.providers import CALLBACK_DIALECTS
from receiver.types import TaskState

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
        413: "Payload too large",
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
            "headers": {"type": "object"},
            "body": {},
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

TASK_ID = path_param("task_id", "The task's id (tsk_…).")

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
                query_param("provider", {"type": "string"}, "Only this provider."),
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
            "responses": {"200": answer("The task", ref("Task")), **errors(400, 401, 404)},
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
            "summary": "A provider's callback (authorised by the signed URL alone)",
            "operationId": "receiveCallback",
            "parameters": [path_param("token", "The signed token from the callback URL.")],
            "requestBody": json_body({"type": "object"}),
            "responses": {"200": answer("Stored", ref("CallbackAck")), **errors(400, 403, 404, 409, 410, 413, 503)},
        }
    },
    "/callbacks/{token}/callback": {
        "post": {
            "summary": "The same, for providers that append /callback to the URL",
            "operationId": "receiveCallbackSuffixed",
            "parameters": [path_param("token", "The signed token from the callback URL.")],
            "requestBody": json_body({"type": "object"}),
            "responses": {"200": answer("Stored", ref("CallbackAck")), **errors(400, 403, 404, 409, 410, 413, 503)},
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
            "responses": {"200": answer("Ready"), "503": answer("Not ready")},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {"200": {"description": "Exposition text", "content": {"text/plain": {}}}},
        }
    },
    "/openapi.json": {
        "get": {"summary": "This document", "operationId": "openapi", "responses": {"200": answer("OpenAPI")}}
    },
}


def document(server_url: str) -> JSON:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": __version__,
            "description": "A webhook callback receiver for asynchronous image-generation APIs.",
        },
        "servers": [{"url": server_url}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
