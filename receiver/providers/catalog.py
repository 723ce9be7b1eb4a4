"""The model catalog (catalog.json) and the one validator that reads it.

    request = validate(body)     # InvalidParameters listing every offending field

Rules are data: which providers exist, which models each offers (a list, or
a `model_pattern` for providers with free-form model ids), which parameters
each takes and of what type (`passthrough` providers take any other parameter
as is, for the model's own input).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, cast

from receiver.errors import InvalidParameters
from receiver.types import JSON

#: Fields of a submission that are the receiver's own, never sent upstream.
OWN_FIELDS = frozenset({"provider", "model", "prompt", "notify_url", "metadata"})

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    provider: str
    model: str
    prompt: str
    params: JSON  # what goes upstream besides model and prompt
    notify_url: str | None = None
    metadata: JSON = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def request(self) -> JSON:
        """The task's `request` as stored and shown: the prompt and the parameters sent."""
        return {"prompt": self.prompt, **self.params}


@cache
def catalog() -> JSON:
    text = resources.files(__package__).joinpath("catalog.json").read_text(encoding="utf-8")
    loaded: JSON = json.loads(text)
    return loaded


def providers() -> list[str]:
    return sorted(catalog()["providers"])


def _model_problem(entry: dict[str, Any], provider: str, model: str) -> str | None:
    """Why `model` is not one `entry` offers: a listed name, or free-form matching `model_pattern`."""
    pattern = entry.get("model_pattern")
    if pattern is not None:
        return None if re.fullmatch(pattern, model) else f"must be {entry['model_hint']}"
    return None if model in entry["models"] else f"{provider} offers: {', '.join(entry['models'])}"


def _param_problem(spec: str | dict[str, Any], value: Any) -> str | None:
    """A parameter's type (`"string"`), or `{"type": "array", "items": [allowed values]}`."""
    kind: str = spec if isinstance(spec, str) else spec["type"]
    if not isinstance(value, _TYPES[kind]) or (kind != "boolean" and isinstance(value, bool)):
        return f"must be of type {kind}"
    allowed: list[Any] | None = None if isinstance(spec, str) else spec.get("items")
    if allowed is not None and (not value or any(item not in allowed for item in cast(list[Any], value))):
        return f"must be a non-empty list of: {', '.join(allowed)}"
    return None


def validate(body: JSON) -> ValidatedRequest:
    """Check a submission against the catalog; every offending field is reported at once."""
    problems: list[dict[str, str]] = []

    def bad(name: str, message: str) -> None:
        problems.append({"field": name, "message": message})

    entries = catalog()["providers"]
    provider = body.get("provider")
    model = body.get("model")
    prompt = body.get("prompt")
    entry: dict[str, Any] | None = None
    if not isinstance(provider, str) or provider not in entries:
        bad("provider", f"must be one of: {', '.join(sorted(entries))}")
    else:
        entry = entries[provider]
    if not isinstance(model, str) or not model:
        bad("model", "is required")
    elif entry is not None and (problem := _model_problem(entry, str(provider), model)):
        bad("model", problem)
    if not isinstance(prompt, str) or not prompt.strip():
        bad("prompt", "is required and must be a non-empty string")
    notify_url = body.get("notify_url")
    if notify_url is not None and not isinstance(notify_url, str):
        bad("notify_url", "must be a URL string")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        bad("metadata", "must be an object")
        metadata = {}

    params: JSON = {}
    if entry is not None:
        known: dict[str, Any] = entry["params"]
        for name, value in body.items():
            if name in OWN_FIELDS:
                continue
            spec = known.get(name)
            if spec is None and not entry.get("passthrough"):
                bad(name, f"is not a parameter {provider} accepts")
            elif value is None:
                continue
            elif spec is not None and (problem := _param_problem(spec, value)):
                bad(name, problem)
            else:
                params[name] = value
    if problems:
        raise InvalidParameters(problems)
    assert isinstance(provider, str) and isinstance(model, str) and isinstance(prompt, str)
    return ValidatedRequest(
        provider=provider,
        model=model,
        prompt=prompt,
        params=params,
        notify_url=notify_url,
        metadata=metadata,
    )
