"""The model catalog (catalog.json) and the one validator that reads it.

    request = validate(body, uploads)      # InvalidParameters listing every offending field
    body, problems = form_body(fields)     # multipart text fields, typed by the catalog

Rules are data, checked before any upstream call. The file's shape:

    {"references": {"mime_types": [...], "max_bytes": N},   reference files, for every provider
     "providers": {"<provider>": {
        "models": {"<model>": {model rules}},              or, for free-form model ids:
        "model_pattern": "regex", "model_hint": "…",        any id matching it (whole), with no rules
        "params": {"<name>": {param rule} | "<type>"},     the parameters it takes
        "passthrough": true,                                any other parameter goes through as is
        "uploads": ["image", "image[]"],                    multipart file fields it takes (default: none)
        "reference_limits": {"mime_types", "max_bytes"},    overrides the file-wide "references" limits
        "references": ["image_input"],                      parameters whose items are reference images
        "max_references": N, "rules": [rule, …]}}}         as in a model, for every model

    model rules  {"params": {"<name>": {param rule}}       merged over the provider's rule of that name
                  "only": ["size"],                         other parameters mean nothing: dropped, with a warning
                  "max_references": N, "rules": [rule, …]}
    param rule   {"type": "string|integer|number|boolean|array|object", "enum": [...], "pattern": "regex",
                  "hint": "shown when the pattern (matched whole) fails", "minimum": n, "maximum": n,
                  "items": {"type": …, "format": "url"} (each item's rule) | [values] (a non-empty
                  list of these), "format": "url" | "url_or_data" (http(s), or a data: URL),
                  "dimensions": {"allow": ["auto"], "multiple_of": 16, "max_side": 3840, "max_pixels": 8294400},
                  "unsupported": "message"}
    rule         {"forbid": {"<param>": [values] | "*", …}, "field": "<param>", "message": "…"}:
                  refused when every named parameter is given with one of its values ("*": any value)
                 {"size_agrees": true, "field": "size"}: `size` must not contradict `resolution` or
                  `aspect_ratio` (`_size_disagrees`)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import orjson

from receiver.assets import sniff
from receiver.delivery.urlguard import MalformedUrl, read_url
from receiver.errors import InvalidParameters
from receiver.nesting import MAX_DEPTH, too_deep
from receiver.providers.base import Upload
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
_DIMENSIONS = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")  # no zero, no leading zero


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    provider: str
    model: str
    prompt: str
    params: JSON  # what goes upstream besides model and prompt
    notify_url: str | None = None
    metadata: JSON = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    uploads: tuple[Upload, ...] = ()  # content types corrected from the files' bytes

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


class _Problems:
    """Offending fields, one entry per field (several complaints about one field are joined)."""

    def __init__(self, initial: Sequence[Mapping[str, str]] = ()) -> None:
        self.items: list[dict[str, str]] = []
        for item in initial:
            self.add(item["field"], item["message"])

    def add(self, name: str, message: str) -> None:
        for item in self.items:
            if item["field"] == name:
                item["message"] += f"; {message}"
                return
        self.items.append({"field": name, "message": message})

    def __contains__(self, name: object) -> bool:
        return any(item["field"] == name for item in self.items)


def model_rules(provider: str, model: str) -> JSON | None:
    """The rules of `model` on `provider` (None: the provider does not offer it)."""
    entry = catalog()["providers"].get(provider)
    if entry is None:
        return None
    if "model_pattern" in entry:
        return {} if re.fullmatch(entry["model_pattern"], model) else None
    rules: JSON | None = entry.get("models", {}).get(model)
    return rules


def param_rules(provider: str, model: str | None) -> dict[str, JSON]:
    """Each parameter's rule for `model` on `provider` (the model's merged over the provider's)."""
    entry = catalog()["providers"][provider]
    merged = {name: _rule(rule) for name, rule in entry.get("params", {}).items()}
    rules = model_rules(provider, model) if model else None
    for name, rule in (rules or {}).get("params", {}).items():
        merged[name] = {**merged.get(name, {}), **rule}
    return merged


def validate(
    body: JSON, uploads: Sequence[Upload] = (), *, problems: Sequence[Mapping[str, str]] = ()
) -> ValidatedRequest:
    """Check a submission against the catalog; every offending field is reported at once.

    `problems` are complaints found earlier (e.g. while reading a form), reported with the rest.
    """
    bad = _Problems(problems)
    entries = catalog()["providers"]
    provider = body.get("provider")
    model = body.get("model")
    prompt = body.get("prompt")
    entry: JSON | None = None
    rules: JSON | None = None
    if not isinstance(provider, str) or provider not in entries:
        bad.add("provider", f"must be one of: {', '.join(sorted(entries))}")
    else:
        entry = entries[provider]
    if not isinstance(model, str) or not model:
        bad.add("model", "is required")
    elif entry is not None and isinstance(provider, str):
        rules = model_rules(provider, model)
        if rules is None:
            if "model_pattern" in entry:
                bad.add("model", f"must be {entry.get('model_hint') or 'a model id ' + provider + ' accepts'}")
            else:
                bad.add("model", f"{provider} offers: {', '.join(entry.get('models', {}))}")
    if not isinstance(prompt, str) or not prompt.strip():
        bad.add("prompt", "is required and must be a non-empty string")
    notify_url = body.get("notify_url")
    if notify_url is not None and not isinstance(notify_url, str):
        bad.add("notify_url", "must be a URL string")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        bad.add("metadata", "must be an object")
        metadata = {}

    params: JSON = {}
    warnings: list[str] = []
    checked_uploads: tuple[Upload, ...] = ()
    if entry is not None and isinstance(provider, str):
        name_of_model = model if isinstance(model, str) and rules is not None else None
        known = param_rules(provider, name_of_model)
        given = {k: v for k, v in body.items() if k not in OWN_FIELDS and v is not None}
        accepted: JSON = {}
        only = (rules or {}).get("only")
        for name, value in given.items():
            rule = known.get(name)
            if rule is None:
                # The model's own input, checked by the provider; or, for a model that reads only a
                # few parameters, one that means nothing to it: dropped below, with a warning.
                if entry.get("passthrough") or only is not None:
                    accepted[name] = value
                else:
                    bad.add(name, f"is not a parameter {provider} accepts")
                continue
            problem = check_param(value, rule)
            if problem is not None:
                bad.add(name, problem)
            else:
                accepted[name] = value
        merged = {**entry, **(rules or {})}
        for rule in [*entry.get("rules", []), *(rules or {}).get("rules", [])]:
            if rule["field"] in bad:
                continue
            if "forbid" in rule and _forbidden(rule["forbid"], accepted):
                bad.add(rule["field"], rule["message"])
            elif rule.get("size_agrees") and (problem := _size_disagrees(accepted)) is not None:
                bad.add(rule["field"], problem)
        checked_uploads = _check_uploads(uploads, entry, provider, bad)
        _check_references(accepted, checked_uploads, entry, merged.get("max_references"), bad)
        for name, value in accepted.items():
            if only is not None and name not in only:
                warnings.append(f"'{name}' means nothing to {model} on {provider}: it was dropped, not sent")
            else:
                params[name] = value
    if bad.items:
        raise InvalidParameters(bad.items)
    assert isinstance(provider, str) and isinstance(model, str) and isinstance(prompt, str)
    return ValidatedRequest(
        provider=provider,
        model=model,
        prompt=prompt,
        params=params,
        notify_url=notify_url,
        metadata=metadata,
        warnings=tuple(warnings),
        uploads=checked_uploads,
    )


def check_param(value: Any, rule: Mapping[str, Any]) -> str | None:
    """What is wrong with `value` under `rule` (None: nothing)."""
    if "unsupported" in rule:
        return str(rule["unsupported"])
    kind = rule.get("type")
    if kind is not None and not _is(value, kind):
        return f"must be of type {kind}"
    if "enum" in rule and value not in rule["enum"]:
        return f"must be one of: {', '.join(_show(v) for v in rule['enum'])}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in rule and value < rule["minimum"]:
            return f"must be at least {rule['minimum']}"
        if "maximum" in rule and value > rule["maximum"]:
            return f"must be at most {rule['maximum']}"
    if isinstance(value, str):
        if "pattern" in rule and not re.fullmatch(rule["pattern"], value):  # `$` alone lets "…\n" through
            return str(rule.get("hint") or f"{value!r} does not match {rule['pattern']}")
        if rule.get("format") == "url" and not _is_url(value):
            return "must be an http(s) URL"
        if rule.get("format") == "url_or_data" and not (_is_url(value) or value.startswith("data:")):
            return "must be an http(s) or data: URL"
        if "dimensions" in rule:
            return _check_dimensions(value, rule["dimensions"])
    items = rule.get("items")
    if isinstance(value, list) and isinstance(items, list):
        if not value or any(item not in items for item in value):
            return f"must be a non-empty list of: {', '.join(_show(v) for v in items)}"
    elif isinstance(value, list) and isinstance(items, dict):
        for index, item in enumerate(value):
            problem = check_param(item, items)
            if problem is not None:
                return f"item {index}: {problem}"
    return None


def _rule(spec: str | JSON) -> JSON:
    """A parameter's rule; a bare type name (`"string"`) is short for `{"type": "string"}`."""
    return {"type": spec} if isinstance(spec, str) else dict(spec)


def _is(value: Any, kind: str) -> bool:
    if kind != "boolean" and isinstance(value, bool):
        return False
    if kind == "number" and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, _TYPES[kind])


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _is_url(value: str) -> bool:
    try:
        read_url(value)
    except MalformedUrl:  # e.g. an unclosed "[" in the host, a space, an empty label: nobody can fetch it
        return False
    return True


def _check_dimensions(value: str, spec: Mapping[str, Any]) -> str | None:
    allowed = list(spec.get("allow", []))
    if value in allowed:
        return None
    match = _DIMENSIONS.fullmatch(value)
    if match is None:
        return f"must be {' or '.join([*allowed, 'WIDTHxHEIGHT'])}, e.g. 1024x1536"
    width, height = int(match.group(1)), int(match.group(2))
    step = spec.get("multiple_of")
    if step and (width % step or height % step):
        return f"width and height must be multiples of {step}"
    if "max_side" in spec and max(width, height) > spec["max_side"]:
        return f"the longer side must be at most {spec['max_side']}"
    if "max_pixels" in spec and width * height > spec["max_pixels"]:
        return f"at most {spec['max_pixels']:,} pixels (width * height), got {width * height:,}"
    return None


def _size_disagrees(params: Mapping[str, Any]) -> str | None:
    """What a router refuses as a conflicting `size`: a tier ("2K") beside another `resolution`, or
    pixels ("2048x1152") beside another `aspect_ratio` (5 % leeway, for presets such as 1792x1024
    as 16:9). Agreeing combinations pass; pixels beside a tier are left to the router to judge."""
    size, resolution, ratio = params.get("size"), params.get("resolution"), params.get("aspect_ratio")
    if not isinstance(size, str) or size == "auto":
        return None
    if size.endswith("K"):
        if isinstance(resolution, str) and resolution != size:
            return f"size {size} and resolution {resolution} disagree: give one of them, or the same tier"
        return None
    match = _DIMENSIONS.fullmatch(size)
    if match is None or not isinstance(ratio, str) or ratio == "auto":
        return None
    width, height = int(match.group(1)), int(match.group(2))
    across, down = (int(part) for part in ratio.split(":"))
    if width and height and across and down and abs((width / height) / (across / down) - 1) > 0.05:
        return f"size {size} is not {ratio}: give pixels of that aspect ratio, or only one of them"
    return None


def _forbidden(forbid: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    return all(name in params and (values == "*" or params[name] in values) for name, values in forbid.items())


def _check_uploads(uploads: Sequence[Upload], entry: JSON, provider: str, bad: _Problems) -> tuple[Upload, ...]:
    fields = entry.get("uploads", [])
    limits = {**catalog()["references"], **entry.get("reference_limits", {})}
    accepted_types: list[str] = limits["mime_types"]
    checked = []
    for upload in uploads:
        if upload.field not in fields:
            where = f"files go in {' or '.join(fields)}" if fields else "give reference images as URLs"
            bad.add(upload.field, f"{provider} takes no file here ({where})")
            continue
        real = sniff(upload.data)
        if real not in accepted_types:
            what = real or "not an image we recognise"
            bad.add(upload.field, f"{upload.filename!r} is {what}; accepted: {', '.join(accepted_types)}")
        elif len(upload.data) > limits["max_bytes"]:
            bad.add(
                upload.field,
                f"{upload.filename!r} is {len(upload.data):,} bytes; at most {limits['max_bytes']:,} bytes each",
            )
        else:
            checked.append(dataclasses.replace(upload, content_type=real))
    return tuple(checked)


def _check_references(params: JSON, uploads: Sequence[Upload], entry: JSON, limit: int | None, bad: _Problems) -> None:
    if limit is None:
        return
    names = [name for name in entry.get("references", []) if isinstance(params.get(name), list)]
    count = sum(len(params[name]) for name in names) + len(uploads)
    if count > limit:
        where = names[0] if names else (uploads[0].field if uploads else "image_input")
        bad.add(where, f"at most {limit} reference images, got {count}")


# --- multipart forms ------------------------------------------------------------------


def form_body(fields: Sequence[tuple[str, str]]) -> tuple[JSON, list[dict[str, str]]]:
    """A submission from multipart text fields: values typed by the catalog's parameter types.

    Repeated fields (`image_input`, `image_input[]`) become a list where the parameter is an
    array; a value that does not read as its type is kept as text, so `validate` reports it.
    """
    grouped: dict[str, list[str]] = {}
    for name, value in fields:
        grouped.setdefault(name.removesuffix("[]"), []).append(value)
    provider = (grouped.get("provider") or [""])[0]
    model = (grouped.get("model") or [""])[0]
    types: dict[str, str] = {"metadata": "object"}
    if provider in catalog()["providers"]:
        known = param_rules(provider, model if model_rules(provider, model) is not None else None)
        types.update({name: rule["type"] for name, rule in known.items() if "type" in rule})
    body: JSON = {}
    problems: list[dict[str, str]] = []
    for name, values in grouped.items():
        kind = "string" if name in OWN_FIELDS - {"metadata"} else types.get(name, "string")
        if kind == "array":
            body[name] = values
        elif len(values) > 1:
            problems.append({"field": name, "message": "is given more than once"})
        else:
            body[name] = _typed(values[0], kind)
            if too_deep(body[name]):  # as a JSON body deeper than this is refused (receiver.nesting)
                problems.append({"field": name, "message": f"nests more than {MAX_DEPTH} levels"})
    return body, problems


def _typed(text: str, kind: str) -> Any:
    if kind == "integer" and re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip()):
        return int(text)
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            return text
        return number if math.isfinite(number) else text
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    if kind in ("object", "array"):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
        return value if _is(value, kind) else text
    return text
