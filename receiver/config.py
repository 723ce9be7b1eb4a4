"""Settings, read once from the environment (DESIGN.md §5).

    settings = Settings.from_env(os.environ)      # pure: nothing written
    settings = ensure_secrets(settings)           # fills generated secrets in

Tests build settings from a plain dict. Secrets are `Secret`s, whose repr
hides the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import sys
from base64 import b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.datastructures import Secret

from receiver.errors import ReceiverError
from receiver.logs import get_logger

T = TypeVar("T")

log = get_logger("receiver.config")

DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

PROVIDER_DEFAULT_URLS = {
    "xhuoapi": "https://api.xhuoapi.ai",
    "xenodia": "https://api.xenodia.xyz",
    "router": "https://openrouter.ai/api",
    "replicate": "https://api.replicate.com",
    "fal": "https://queue.fal.run",
}
FAL_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"


class ConfigError(ReceiverError):
    """An environment variable holds a value the receiver cannot use."""


@dataclass(frozen=True)
class ProviderSettings:
    url: str
    api_key: Secret | None = None


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///./data/receiver.db"
    public_url: str = "http://127.0.0.1:8000"
    data_dir: Path = Path("data")
    secret_keys: tuple[Secret, ...] = ()
    api_keys: tuple[Secret, ...] = ()
    notify_secret: Secret | None = None
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    replicate_webhook_secret: Secret | None = None
    fal_jwks_url: str | None = FAL_JWKS_URL  # None: fal signatures are not checked ("off")
    fal_user_ids: tuple[str, ...] = ()  # when set, only these fal accounts' callbacks are accepted
    poll_interval: float = 2.0
    poll_max_interval: float = 30.0
    callback_max_age: int = 604800
    task_timeout: float = 3600.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    delivery_timeout: float = 10.0
    disable_after: float = 5 * 86400.0
    delivery_concurrency: int = 10
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    provider_timeout: float = 30.0
    router_timeout: float = 600.0
    max_upload_bytes: int = 64 * 1024 * 1024
    allow_private_urls: bool = False
    max_body_bytes: int = 1048576
    mirror_assets: bool = True
    asset_dir: Path = Path("data/assets")
    mirror_max_bytes: int = 50 * 1024 * 1024  # largest image kept
    mirror_timeout: float = 60.0  # seconds to download one image
    job_lease: float = 30.0  # seconds a background job stays claimed without renewal
    metrics_tokens: tuple[Secret, ...] = ()  # any one opens /metrics; none: /metrics is open
    forwarded_allow_ips: str = "127.0.0.1"
    log_level: str = "info"
    shutdown_timeout: float = 10.0  # seconds a stopping server waits for requests and deliveries in flight
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0  # seconds a client has to send a request's head
    body_timeout: float = 60.0  # seconds a client has to send a request's whole body
    max_header_bytes: int = 16384  # largest request head (request line and headers)
    max_streams_per_key: int = 100  # long-polls and SSE streams open at once per API key
    max_callbacks_per_task: int = 100  # callbacks stored per task; beyond it 429, nothing stored

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read every `RECEIVER_*` variable; raise ConfigError naming a bad one."""
        env = _Env(environ)
        database_url = env("RECEIVER_DATABASE_URL", _database_url, cls.database_url)
        data_dir = Path(env("RECEIVER_DATA_DIR", str, str(_default_data_dir(database_url))))
        providers = {
            name: ProviderSettings(
                url=env(f"RECEIVER_{name.upper()}_URL", _url, default).rstrip("/"),
                api_key=env(f"RECEIVER_{name.upper()}_API_KEY", Secret, None),
            )
            for name, default in PROVIDER_DEFAULT_URLS.items()
        }
        settings = cls(
            database_url=database_url,
            public_url=env("RECEIVER_PUBLIC_URL", _url, cls.public_url).rstrip("/"),
            data_dir=data_dir,
            secret_keys=env("RECEIVER_SECRET_KEY", _secret_list, ()),
            api_keys=env("RECEIVER_API_KEYS", _secret_list, ()),
            notify_secret=env("RECEIVER_NOTIFY_SECRET", _whsec_list, None),
            providers=providers,
            replicate_webhook_secret=env("RECEIVER_REPLICATE_WEBHOOK_SECRET", _whsec_list, None),
            fal_jwks_url=env("RECEIVER_FAL_JWKS_URL", _url_or_off, FAL_JWKS_URL),
            fal_user_ids=env("RECEIVER_FAL_USER_IDS", _list, ()),
            poll_interval=env("RECEIVER_POLL_INTERVAL", _positive_float, cls.poll_interval),
            poll_max_interval=env("RECEIVER_POLL_MAX_INTERVAL", _positive_float, cls.poll_max_interval),
            callback_max_age=env("RECEIVER_CALLBACK_MAX_AGE", _positive_int, cls.callback_max_age),
            task_timeout=env("RECEIVER_TASK_TIMEOUT", _positive_float, cls.task_timeout),
            retry_schedule=env("RECEIVER_RETRY_SCHEDULE", _schedule, DEFAULT_RETRY_SCHEDULE),
            delivery_timeout=env("RECEIVER_DELIVERY_TIMEOUT", _positive_float, cls.delivery_timeout),
            disable_after=env("RECEIVER_DISABLE_AFTER", _positive_float, cls.disable_after),
            delivery_concurrency=env("RECEIVER_DELIVERY_CONCURRENCY", _positive_int, cls.delivery_concurrency),
            breaker_failures=env("RECEIVER_BREAKER_FAILURES", _positive_int, cls.breaker_failures),
            breaker_cooldown=env("RECEIVER_BREAKER_COOLDOWN", _positive_float, cls.breaker_cooldown),
            provider_timeout=env("RECEIVER_PROVIDER_TIMEOUT", _positive_float, cls.provider_timeout),
            router_timeout=env("RECEIVER_ROUTER_TIMEOUT", _positive_float, cls.router_timeout),
            max_upload_bytes=env("RECEIVER_MAX_UPLOAD_BYTES", _positive_int, cls.max_upload_bytes),
            allow_private_urls=env("RECEIVER_ALLOW_PRIVATE_URLS", _bool, False),
            max_body_bytes=env("RECEIVER_MAX_BODY_BYTES", _positive_int, cls.max_body_bytes),
            mirror_assets=env("RECEIVER_MIRROR_ASSETS", _bool, True),
            asset_dir=Path(env("RECEIVER_ASSET_DIR", str, str(data_dir / "assets"))),
            mirror_max_bytes=env("RECEIVER_MIRROR_MAX_BYTES", _positive_int, cls.mirror_max_bytes),
            mirror_timeout=env("RECEIVER_MIRROR_TIMEOUT", _positive_float, cls.mirror_timeout),
            job_lease=env("RECEIVER_JOB_LEASE", _positive_float, cls.job_lease),
            metrics_tokens=env("RECEIVER_METRICS_TOKEN", _secret_list, ()),
            forwarded_allow_ips=env("RECEIVER_FORWARDED_ALLOW_IPS", str, cls.forwarded_allow_ips),
            log_level=env("RECEIVER_LOG_LEVEL", _log_level, cls.log_level),
            shutdown_timeout=env("RECEIVER_SHUTDOWN_TIMEOUT", _positive_float, cls.shutdown_timeout),
            keep_alive_timeout=env("RECEIVER_KEEP_ALIVE_TIMEOUT", _positive_float, cls.keep_alive_timeout),
            header_timeout=env("RECEIVER_HEADER_TIMEOUT", _positive_float, cls.header_timeout),
            body_timeout=env("RECEIVER_BODY_TIMEOUT", _positive_float, cls.body_timeout),
            max_header_bytes=env("RECEIVER_MAX_HEADER_BYTES", _positive_int, cls.max_header_bytes),
            max_streams_per_key=env("RECEIVER_MAX_STREAMS_PER_KEY", _positive_int, cls.max_streams_per_key),
            max_callbacks_per_task=env("RECEIVER_MAX_CALLBACKS_PER_TASK", _positive_int, cls.max_callbacks_per_task),
        )
        if settings.poll_interval > settings.poll_max_interval:
            raise ConfigError(
                f"RECEIVER_POLL_INTERVAL ({settings.poll_interval:g} s, the first delay between polls) is longer "
                f"than RECEIVER_POLL_MAX_INTERVAL ({settings.poll_max_interval:g} s, the longest)"
            )
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def provider(self, name: str) -> ProviderSettings:
        return self.providers.get(name) or ProviderSettings(url=PROVIDER_DEFAULT_URLS.get(name, ""))

    @property
    def notify_secrets(self) -> tuple[str, ...]:
        """What signs `notify_url` deliveries: every secret of RECEIVER_NOTIFY_SECRET's comma list
        (`whsec_new,whsec_old` while it is rotated: each delivery carries a signature per secret)."""
        return tuple(whsec_secrets(str(self.notify_secret))) if self.notify_secret is not None else ()


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def __call__(self, key: str, cast: Callable[[str], T], default: Any) -> Any:
        raw = self.environ.get(key)
        if raw is None or raw.strip() == "":
            return default
        try:
            return cast(raw.strip())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: {exc}") from exc


def _default_data_dir(database_url: str) -> Path:
    if database_url.startswith("sqlite:///"):
        path = sqlite_path(database_url)
        if path is not None:
            return path.parent
    return Path("data")


def _database_url(value: str) -> str:
    if value.startswith("sqlite:///"):
        if sqlite_path(value) is None:  # the writer and the readers are separate connections
            raise ValueError("SQLite needs a file path (sqlite:///relative/path or sqlite:////absolute/path)")
        return value
    if value.startswith(("postgresql://", "postgres://")):
        from receiver.store.postgres import parse_url  # here: asyncpg is loaded only for PostgreSQL

        parse_url(value)  # the receiver's own parameters (?schema=, ?pool_size=): ValueError names a bad one
        return value
    raise ValueError("use sqlite:///relative/path, sqlite:////absolute/path or postgresql://…")


def sqlite_path(database_url: str) -> Path | None:
    """`sqlite:///rel/x.db` -> rel/x.db, `sqlite:////abs/x.db` -> /abs/x.db, `:memory:` -> None."""
    rest = database_url.removeprefix("sqlite:///")
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def _url_or_off(value: str) -> str | None:
    return None if value.lower() == "off" else _url(value)


def _list(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected one or more comma-separated values")
    return items


def _secret_list(value: str) -> tuple[Secret, ...]:
    items = tuple(Secret(v.strip()) for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected one or more comma-separated values")
    return items


def whsec(value: str) -> Secret:
    """One `whsec_<base64>` secret (ValueError otherwise): the prefix, then base64 that decodes to
    something. Also `receiver fake-provider --replicate-secret`'s check."""
    import binascii
    from base64 import b64decode

    body = value.removeprefix("whsec_")  # standard base64: the library signs with what it decodes
    try:
        if not value.startswith("whsec_") or not b64decode(body + "=" * (-len(body) % 4), validate=True):
            raise ValueError("not whsec_<base64>")
    except (ValueError, binascii.Error) as exc:
        raise ValueError("expected a whsec_<base64> secret") from exc
    return Secret(value)


def _whsec_list(value: str) -> Secret:
    """One `whsec_<base64>` secret or several separated by commas (`whsec_secrets`)."""
    parts = whsec_secrets(value)
    try:
        if not parts:
            raise ValueError("no secret")
        for part in parts:
            whsec(part)
    except ValueError as exc:
        raise ValueError("expected a whsec_<base64> secret, or several separated by commas") from exc
    return Secret(value)


def whsec_secrets(value: str) -> list[str]:
    """The secrets of a comma list (`whsec_new,whsec_old`; empty parts skipped, as in the other
    lists): while a provider's secret is rotated, a signature under any of them verifies."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _positive_float(value: str) -> float:
    number = _number(float, value, "a positive number")
    if not 0 < number < math.inf:  # also refuses nan and inf: deadlines built on them cannot be shown or stored
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _number(int, value, "a positive integer")
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _number(kind: Callable[[str], T], value: str, expected: str) -> T:
    """`value` read as `kind`, with a message that says what was expected (not Python's own)."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"expected {expected}, got {value!r}") from None


def _schedule(value: str) -> tuple[float, ...]:
    expected = "comma-separated non-negative seconds, e.g. 0,5,300"
    delays = tuple(_number(float, part.strip(), expected) for part in value.split(",") if part.strip())
    if not delays or any(not 0 <= d < math.inf for d in delays):
        raise ValueError("expected comma-separated non-negative seconds, e.g. 0,5,300")
    return delays


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 0 or 1, got {value!r}")


def _log_level(value: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("expected debug, info, warning or error")
    return value.lower()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes."""
    return "whsec_" + b64encode(secrets.token_bytes(24)).decode()


def ensure_secrets(settings: Settings, *, announce: Callable[[str], None] | None = None) -> Settings:
    """Fill in every secret the operator did not set from `<data dir>/secrets.json`.

    Missing ones are generated once and written there with mode 0600; a newly
    generated API key is announced (printed once, never logged).
    """
    missing = not settings.secret_keys or not settings.api_keys or settings.notify_secret is None
    if not missing:
        return settings
    path = settings.data_dir / "secrets.json"
    if not settings.database_url.startswith("sqlite:"):
        # Instances sharing a database must share secrets: a URL signed by one is checked by another.
        log.warning(
            "config.secrets_not_shared",
            path=str(path),
            advice="set RECEIVER_SECRET_KEY, RECEIVER_API_KEYS and RECEIVER_NOTIFY_SECRET on every instance",
        )
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON; fix or delete it") from exc
    generated = []
    makers: tuple[tuple[str, bool, Callable[[], str]], ...] = (
        ("secret_key", not settings.secret_keys, lambda: secrets.token_urlsafe(32)),
        ("api_key", not settings.api_keys, lambda: "rk_" + secrets.token_urlsafe(24)),
        ("notify_secret", settings.notify_secret is None, new_webhook_secret),
    )
    for name, needed, make in makers:  # only what the operator did not set
        if needed and name not in stored:
            stored[name] = make()
            generated.append(name)
    if generated:
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(stored, handle, indent=2)
            os.replace(tmp, path)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot store the generated secrets in {path} ({exc.strerror}): set RECEIVER_DATA_DIR to a "
                "writable folder, or set RECEIVER_SECRET_KEY, RECEIVER_API_KEYS and RECEIVER_NOTIFY_SECRET"
            ) from exc
    if "secret_key" in generated:
        log.warning(
            "config.secret_generated",
            path=str(path),
            advice="set RECEIVER_SECRET_KEY explicitly when running several instances or rebuilding the data folder",
        )
    changes: dict[str, Any] = {}
    if not settings.secret_keys:
        changes["secret_keys"] = (Secret(stored["secret_key"]),)
    if not settings.api_keys:
        changes["api_keys"] = (Secret(stored["api_key"]),)
        if "api_key" in generated:
            (announce or _print_stderr)(
                f"Generated an API key (stored in {path}, shown only this once):\n\n"
                f"    {stored['api_key']}\n\n"
                "Use it as 'Authorization: Bearer <key>' or set RECEIVER_API_KEYS to choose your own."
            )
    if settings.notify_secret is None:
        changes["notify_secret"] = Secret(stored["notify_secret"])
    return settings.replace(**changes)


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
