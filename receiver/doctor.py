"""`receiver doctor`: is this receiver set up right, and does its public URL reach it?

    report = await diagnose(os.environ, url="http://127.0.0.1:8000")
    report.ok                     # False when any check failed
    print(report.text())          # or report.to_json()

It reads the same environment as `receiver serve` and checks, without
changing anything: the configuration parses; the public URL is https (or
loopback, for local work); the secrets are set (or were generated); the
database answers and is migrated; each provider has a key (or points at a
local fake); Replicate's and fal's signatures will be checked; the asset
folder is writable. Then it talks to the running receiver (`url`): ready, the
API key accepted, and a self-test callback (receiver.selftest) signed with the
shared secret key, sent straight to it and then through RECEIVER_PUBLIC_URL.
Both answers name the instance that answered, so the second proves the tunnel
(or the deployment's address) reaches this very receiver — nothing is stored.
Every problem comes with how to fix it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from starlette.datastructures import Secret

from receiver import __version__, selftest
from receiver.assets import AssetStore
from receiver.client import default_api_key
from receiver.config import PROVIDER_DEFAULT_URLS, ConfigError, Settings, sqlite_path
from receiver.signing import AssetSigner, CallbackSigner
from receiver.store import migrations

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_MARKS = {OK: "ok  ", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}
_SECRETS = (
    ("secret_key", "RECEIVER_SECRET_KEY", "secret_keys"),
    ("api_key", "RECEIVER_API_KEYS", "api_keys"),
    ("notify_secret", "RECEIVER_NOTIFY_SECRET", "notify_secret"),
)
TUNNELS = "see the README's 'Tunnels' section"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # ok, warn, fail, skip
    message: str
    fix: str | None = None


@dataclass
class Report:
    url: str
    public_url: str | None
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, message: str, fix: str | None = None) -> Check:
        check = Check(name, status, message, fix)
        self.checks.append(check)
        return check

    @property
    def problems(self) -> int:
        return sum(c.status == FAIL for c in self.checks)

    @property
    def warnings(self) -> int:
        return sum(c.status == WARN for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "receiver": self.url,
            "public_url": self.public_url,
            "problems": self.problems,
            "warnings": self.warnings,
            "checks": [asdict(check) for check in self.checks],
        }

    def text(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"receiver doctor — receiver at {self.url}, public URL {self.public_url or '?'}", ""]
        for check in self.checks:
            lines.append(f"  {_MARKS[check.status]}  {check.name.ljust(width)}  {check.message}")
            if check.fix and check.status in (WARN, FAIL):
                lines.append(f"        {' ' * width}  fix: {check.fix}")
        lines.append("")
        if self.ok:
            lines.append("No problems" + (f", {self.warnings} warning(s)." if self.warnings else "."))
        else:
            lines.append(f"{self.problems} problem(s), {self.warnings} warning(s).")
        return "\n".join(lines)


async def diagnose(
    environ: Mapping[str, str],
    *,
    url: str,
    timeout: float = 10.0,
    self_test: bool = True,
) -> Report:
    """Run every check (see the module docstring) against the environment and the receiver at `url`."""
    url = url.rstrip("/")
    report = Report(url, environ.get("RECEIVER_PUBLIC_URL"))
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        report.add("configuration", FAIL, str(exc), "fix or unset that variable (the README's Configuration table)")
        return report
    report.public_url = settings.public_url
    report.add("configuration", OK, f"the RECEIVER_* variables parse (receiver {__version__})")
    _public_url(report, settings)
    settings = _secrets(report, settings, environ)
    await _database(report, settings)
    _providers(report, settings)
    _signatures(report, settings)
    await _assets(report, settings)
    if self_test:
        api_key = environ.get("RECEIVER_API_KEY") or default_api_key(environ)
        if api_key is None and settings.api_keys:
            api_key = str(settings.api_keys[0])
        await _live(report, settings, url, api_key, timeout)
    return report


# --- configuration ------------------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_url(report: Report, settings: Settings) -> None:
    public = settings.public_url
    parts = urlsplit(public)
    if parts.query or parts.fragment:
        report.add(
            "public URL",
            FAIL,
            f"{public} has a query or fragment",
            "set RECEIVER_PUBLIC_URL to a base URL, e.g. https://x.example",
        )
    elif parts.scheme == "https":
        report.add("public URL", OK, f"{public} (callback URLs start with {public}/callbacks/)")
    elif is_loopback(public):
        report.add(
            "public URL",
            WARN,
            f"{public} reaches only this machine: fine with `receiver fake-provider`, "
            "but a real provider cannot call back",
            f"start a tunnel (cloudflared, ngrok) and set RECEIVER_PUBLIC_URL to its https address; {TUNNELS}",
        )
    else:
        report.add(
            "public URL",
            FAIL,
            f"{public} is plain http: providers would post results (and callback tokens) unencrypted",
            "use an https address: the tunnel's https URL, or TLS in front of the receiver (the README's Deploy)",
        )


def _secrets(report: Report, settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Check the secrets; returns the settings with the generated ones filled in (read, never written)."""
    path = settings.data_dir / "secrets.json"
    stored: dict[str, Any] = {}
    try:
        if path.exists():
            stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report.add("secrets", FAIL, f"{path} cannot be read: {exc}", f"fix or delete {path} (it is generated again)")
        return settings
    from_env, from_file, missing = [], [], []
    changes: dict[str, Any] = {}
    for name, variable, attribute in _SECRETS:
        if getattr(settings, attribute):
            from_env.append(variable)
        elif isinstance(stored.get(name), str):
            from_file.append(variable)
            value = Secret(stored[name])
            changes[attribute] = value if attribute == "notify_secret" else (value,)
        else:
            missing.append(variable)
    settings = settings.replace(**changes)
    shared = not settings.database_url.startswith("sqlite:")
    if missing:
        report.add(
            "secrets",
            WARN,
            f"{', '.join(missing)} not set and not generated yet (no {path})",
            "start `receiver serve` once (it generates them into the data folder) or set them",
        )
    elif from_file and shared:
        report.add(
            "secrets",
            WARN,
            f"{', '.join(from_file)} come from {path}: other instances on this database have their own",
            "set RECEIVER_SECRET_KEY, RECEIVER_API_KEYS and RECEIVER_NOTIFY_SECRET, the same on every instance",
        )
    else:
        where = "the environment" if not from_file else f"the environment and {path} (generated)"
        report.add("secrets", OK, f"secret key, API keys and notify secret from {where}")
    if settings.secret_keys and len(str(settings.secret_keys[0])) < 16:
        report.add(
            "secret key",
            WARN,
            "RECEIVER_SECRET_KEY is shorter than 16 characters: callback URLs are only as strong as it",
            "use a long random value, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        )
    return settings


async def _database(report: Report, settings: Settings) -> None:
    url = settings.database_url
    try:
        if url.startswith("sqlite:"):
            current, wanted, where = await asyncio.to_thread(_sqlite_version, url)
        else:
            current, wanted, where = await _postgres_version(url)
    except _DatabaseProblem as exc:
        report.add("database", FAIL, str(exc), exc.fix)
        return
    if current != wanted:
        report.add(
            "database",
            FAIL,
            f"{where}: migrations not current (database at {current or 'none'}, this receiver wants {wanted})",
            "run `receiver migrate` (or start `receiver serve`, which migrates)",
        )
    else:
        report.add("database", OK, f"{where}: reachable, migrations current ({wanted})")


class _DatabaseProblem(Exception):
    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def _sqlite_version(url: str) -> tuple[str | None, str, str]:
    path = sqlite_path(url)
    wanted = migrations.latest("sqlite")
    if path is None:
        raise _DatabaseProblem("an in-memory SQLite database keeps nothing", "point RECEIVER_DATABASE_URL at a file")
    if not path.exists():
        raise _DatabaseProblem(f"no SQLite database at {path}", "run `receiver migrate` or start `receiver serve` once")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return None, wanted, f"SQLite at {path}"
        raise _DatabaseProblem(f"SQLite at {path} cannot be read: {exc}", "check the file and its permissions") from exc
    return (row[0] if row else None), wanted, f"SQLite at {path}"


async def _postgres_version(url: str) -> tuple[str | None, str, str]:
    import asyncpg

    from receiver.store.postgres import parse_url

    try:
        target = parse_url(url)
    except ValueError as exc:
        raise _DatabaseProblem(f"RECEIVER_DATABASE_URL: {exc}", "fix the URL (the README's Scaling out)") from exc
    host = urlsplit(target.dsn).hostname or "?"
    where = f"PostgreSQL at {host}" + (f" (schema {target.schema})" if target.schema else "")
    wanted = migrations.latest("postgres")
    settings = {"search_path": target.schema} if target.schema else None
    try:
        conn = await asyncpg.connect(target.dsn, timeout=5, server_settings=settings)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:  # never echo the URL
        raise _DatabaseProblem(
            f"cannot connect to {where}: {type(exc).__name__}: {exc}",
            "check RECEIVER_DATABASE_URL (host, port, password, sslmode) and that the server accepts this machine",
        ) from exc
    try:
        current = await conn.fetchval("SELECT max(version) FROM schema_migrations", timeout=5)
    except asyncpg.UndefinedTableError:
        current = None
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise _DatabaseProblem(f"{where} answered: {exc}", "check the database user's rights") from exc
    finally:
        await conn.close()
    return current, wanted, where


def _providers(report: Report, settings: Settings) -> None:
    for name in PROVIDER_DEFAULT_URLS:
        provider = settings.provider(name)
        variable = f"RECEIVER_{name.upper()}_API_KEY"
        if provider.api_key is not None:
            report.add(f"provider {name}", OK, f"key set, {provider.url}")
        elif is_loopback(provider.url):
            report.add(f"provider {name}", OK, f"no key needed: {provider.url} is on this machine (a fake provider)")
        else:
            report.add(
                f"provider {name}",
                WARN,
                f"no API key: {name} tasks will be refused (401) by {provider.url}",
                f"set {variable} if you use {name}; ignore this otherwise",
            )


def _signatures(report: Report, settings: Settings) -> None:
    if settings.replicate_webhook_secret is not None:
        report.add("replicate signatures", OK, "checked with RECEIVER_REPLICATE_WEBHOOK_SECRET")
    else:
        report.add(
            "replicate signatures",
            WARN,
            "not checked: Replicate callbacks are accepted on their URL token alone (tasks say so)",
            "set RECEIVER_REPLICATE_WEBHOOK_SECRET to the account's whsec_ secret "
            "(GET https://api.replicate.com/v1/webhooks/default/secret)",
        )
    if settings.fal_jwks_url is None:
        report.add(
            "fal signatures",
            WARN,
            "not checked (RECEIVER_FAL_JWKS_URL=off): fal callbacks are accepted on their URL token alone",
            "unset RECEIVER_FAL_JWKS_URL (fal's published keys are the default)",
        )
    elif not settings.fal_user_ids:
        report.add(
            "fal signatures",
            WARN,
            f"checked against {settings.fal_jwks_url}, but fal's keys sign every fal account's webhooks: "
            "anyone with a leaked callback URL and a fal account of their own can post a signed result",
            "set RECEIVER_FAL_USER_IDS to your fal account id (the x-fal-webhook-user-id of a stored callback)",
        )
    else:
        accounts = ", ".join(settings.fal_user_ids)
        report.add("fal signatures", OK, f"checked against {settings.fal_jwks_url}, for fal accounts {accounts}")


async def _assets(report: Report, settings: Settings) -> None:
    store = AssetStore(settings.asset_dir, AssetSigner(["unused"]), settings.public_url)
    problem = await asyncio.to_thread(store.unwritable)
    use = "kept images and inline (b64_json) images" if settings.mirror_assets else "inline (b64_json) images"
    if problem is not None:
        report.add("asset folder", FAIL, problem, "set RECEIVER_ASSET_DIR to a folder the receiver may write")
    elif settings.mirror_assets and not settings.database_url.startswith("sqlite:"):
        report.add(
            "asset folder",
            WARN,
            f"{settings.asset_dir} is this machine's: other instances keep their own files",
            "share the folder between instances, or set RECEIVER_MIRROR_ASSETS=0",
        )
    else:
        mirroring = "on" if settings.mirror_assets else "off (RECEIVER_MIRROR_ASSETS=0)"
        report.add("asset folder", OK, f"{settings.asset_dir} is writable ({use}; mirroring {mirroring})")


# --- the running receiver ------------------------------------------------------------------------


async def _live(report: Report, settings: Settings, url: str, api_key: str | None, timeout: float) -> None:
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as http:
        try:
            ready = await http.get(f"{url}/readyz")
        except httpx.HTTPError as exc:
            report.add(
                "receiver",
                FAIL,
                f"nothing answers at {url} ({type(exc).__name__})",
                "start it (`receiver serve`), or point doctor at it with --url / RECEIVER_URL",
            )
            report.add("self-test", SKIP, "needs the running receiver")
            report.add("self-test via public URL", SKIP, "needs the running receiver")
            return
        if ready.status_code != 200:
            reason = _json(ready).get("reason") or f"HTTP {ready.status_code}"
            report.add(
                "receiver", FAIL, f"{url} is not ready: {reason}", "see its log; `receiver migrate` if it says so"
            )
        else:
            report.add("receiver", OK, f"{url} is ready")
        await _api_key(report, http, url, api_key)
        if not settings.secret_keys:
            report.add(
                "self-test",
                SKIP,
                "no secret key to sign it with",
                "start `receiver serve` once, or set RECEIVER_SECRET_KEY",
            )
            return
        signer = CallbackSigner([str(k) for k in settings.secret_keys])
        local = await _self_test(http, url, signer)
        local_check = _judge_local(report, settings, url, local)
        if local_check is None:
            report.add("self-test via public URL", SKIP, "needs a receiver that answers self-tests at --url")
            return
        remote = await _self_test(http, settings.public_url, signer)
        _judge_tunnel(report, settings, url, local, remote)


async def _api_key(report: Report, http: httpx.AsyncClient, url: str, api_key: str | None) -> None:
    if api_key is None:
        report.add("API key", WARN, "no API key to try", "set RECEIVER_API_KEY (or RECEIVER_API_KEYS)")
        return
    try:
        answer = await http.get(f"{url}/v1/tasks", params={"limit": 1}, headers={"authorization": f"Bearer {api_key}"})
    except httpx.HTTPError as exc:
        report.add("API key", FAIL, f"{url} did not answer: {type(exc).__name__}")
        return
    if answer.status_code == 401:
        report.add(
            "API key",
            FAIL,
            f"the receiver at {url} refuses this environment's API key: it was started with other keys",
            "run doctor with the receiver's environment, or set RECEIVER_API_KEY to one of its RECEIVER_API_KEYS",
        )
    elif answer.status_code == 200:
        report.add("API key", OK, "accepted by the receiver")
    else:
        report.add("API key", WARN, f"GET /v1/tasks answered HTTP {answer.status_code}")


@dataclass
class _Answer:
    status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    ms: float = 0.0
    location: str | None = None
    nonce: str = ""

    @property
    def is_self_test(self) -> bool:
        return self.status == 200 and self.body.get("self_test") is True and self.body.get("nonce") == self.nonce


async def _self_test(http: httpx.AsyncClient, base: str, signer: CallbackSigner) -> _Answer:
    nonce = secrets.token_hex(8)
    target = f"{base.rstrip('/')}/callbacks/{selftest.mint(signer, nonce)}"
    started = time.perf_counter()
    try:
        response = await http.post(
            target, json={"self_test": nonce}, headers={"user-agent": f"receiver-doctor/{__version__}"}
        )
    except httpx.HTTPError as exc:
        return _Answer(error=f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__, nonce=nonce)
    ms = (time.perf_counter() - started) * 1000
    return _Answer(response.status_code, _json(response), None, ms, response.headers.get("location"), nonce)


def _judge_local(report: Report, settings: Settings, url: str, answer: _Answer) -> _Answer | None:
    if answer.is_self_test:
        if answer.body.get("public_url") != settings.public_url:
            report.add(
                "public URL in use",
                FAIL,
                f"the receiver at {url} was started with RECEIVER_PUBLIC_URL={answer.body.get('public_url')}, "
                f"this environment says {settings.public_url}: the callback URLs it hands out point elsewhere",
                "restart `receiver serve` with the same RECEIVER_PUBLIC_URL (after starting the tunnel)",
            )
        else:
            report.add(
                "self-test",
                OK,
                f"the receiver at {url} answers signed self-tests (instance {answer.body.get('instance')})",
            )
        return answer
    code = answer.body.get("error", {}).get("code") if isinstance(answer.body.get("error"), dict) else None
    if code == "invalid_signature":
        report.add(
            "self-test",
            FAIL,
            f"the receiver at {url} refuses callback URLs signed with this environment's secret key",
            "run doctor with the receiver's environment (the same RECEIVER_SECRET_KEY or data folder)",
        )
    else:
        detail = answer.error or f"HTTP {answer.status}"
        report.add(
            "self-test", FAIL, f"the receiver at {url} did not answer the self-test ({detail})", "upgrade or restart it"
        )
    return None


def _judge_tunnel(report: Report, settings: Settings, url: str, local: _Answer, remote: _Answer) -> None:
    public = settings.public_url
    name = "self-test via public URL"
    if remote.is_self_test:
        same = remote.body.get("instance") == local.body.get("instance")
        if same:
            report.add(name, OK, f"{public} reaches this receiver ({remote.ms:.0f} ms)")
        elif not settings.database_url.startswith("sqlite:"):
            report.add(
                name,
                OK,
                f"{public} reaches instance {remote.body.get('instance')} of this deployment "
                f"(same secrets and database; {url} is {local.body.get('instance')})",
            )
        else:
            report.add(
                name,
                FAIL,
                f"{public} reaches another receiver (instance {remote.body.get('instance')}, same secret key), "
                f"not the one at {url} (instance {local.body.get('instance')})",
                f"point the tunnel at {url} (e.g. `cloudflared tunnel --url {url}`), or stop the other receiver",
            )
            return
        seen = remote.body.get("scheme")
        wanted = urlsplit(public).scheme
        if seen != wanted:
            report.add(
                "proxy headers",
                WARN,
                f"the receiver saw {seen}:// for a {wanted}:// request: "
                "the proxy's X-Forwarded-* headers are not trusted",
                "set RECEIVER_FORWARDED_ALLOW_IPS (or `receiver serve --forwarded-allow-ips`) to the proxy's address",
            )
        return
    if remote.error is not None:
        report.add(
            name,
            FAIL,
            f"nothing answers at {public} ({remote.error})",
            f"start the tunnel (e.g. `cloudflared tunnel --url {url}`) and set RECEIVER_PUBLIC_URL to the address "
            f"it prints; {TUNNELS}",
        )
    elif remote.status is not None and 300 <= remote.status < 400:
        report.add(
            name,
            FAIL,
            f"{public} redirects (HTTP {remote.status} to {remote.location}): providers do not follow redirects",
            "set RECEIVER_PUBLIC_URL to the final address (https, the exact host)",
        )
    elif isinstance(remote.body.get("error"), dict) and remote.body["error"].get("code") == "invalid_signature":
        report.add(
            name,
            FAIL,
            f"{public} reaches a receiver with another secret key — another receiver, not this one",
            f"point the tunnel at {url}",
        )
    else:
        report.add(
            name,
            FAIL,
            f"{public} answered HTTP {remote.status}, not as a receiver does: the tunnel does not lead to {url}",
            f"point the tunnel at {url} (the port `receiver serve` listens on) and check it is running",
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
