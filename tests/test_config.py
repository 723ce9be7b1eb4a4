from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from starlette.datastructures import Secret

from receiver.config import DEFAULT_RETRY_SCHEDULE, ConfigError, Settings, ensure_secrets, sqlite_path, whsec_secrets
from tests.conftest import NOTIFY_SECRET


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///./data/receiver.db"
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.retry_schedule == DEFAULT_RETRY_SCHEDULE
    assert settings.max_body_bytes == 1048576
    assert settings.callback_max_age == 604800 and settings.task_timeout == 3600
    assert settings.provider("xhuoapi").url == "https://api.xhuoapi.ai"
    assert settings.data_dir == Path("data")


class _Watched(dict[str, str]):
    """An empty environment that remembers every variable asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return default


def test_every_variable_read_is_in_the_readme_table_and_no_other() -> None:
    environ = _Watched()
    Settings.from_env(environ)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("### Limits")]
    documented = {name for row in table.splitlines() if row.startswith("| `RECEIVER_")
                  for name in re.findall(r"`(RECEIVER_[A-Z_]+)`", row.split(" | ")[0])}
    assert environ.asked, "the settings read nothing"
    assert environ.asked - documented == set(), "read but not in the README's Configuration table"
    assert documented - environ.asked == set(), "in the README's Configuration table but never read"


def test_environment_is_read() -> None:
    settings = Settings.from_env(
        {
            "RECEIVER_DATABASE_URL": "sqlite:////srv/r/receiver.db",
            "RECEIVER_PUBLIC_URL": "https://abc.trycloudflare.com/",
            "RECEIVER_SECRET_KEY": "new, old",
            "RECEIVER_API_KEYS": "a,b",
            "RECEIVER_XHUOAPI_URL": "http://127.0.0.1:9000/",
            "RECEIVER_XHUOAPI_API_KEY": "sk-1",
            "RECEIVER_RETRY_SCHEDULE": "0,1,2",
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            "RECEIVER_DELIVERY_CONCURRENCY": "4",
            "RECEIVER_BREAKER_FAILURES": "3",
            "RECEIVER_BREAKER_COOLDOWN": "2.5",
        }
    )
    assert settings.public_url == "https://abc.trycloudflare.com"
    assert [str(k) for k in settings.secret_keys] == ["new", "old"]
    assert [str(k) for k in settings.api_keys] == ["a", "b"]
    assert settings.provider("xhuoapi").url == "http://127.0.0.1:9000"
    assert str(settings.provider("xhuoapi").api_key) == "sk-1"
    assert settings.retry_schedule == (0.0, 1.0, 2.0)
    assert settings.allow_private_urls is True
    assert (settings.delivery_concurrency, settings.breaker_failures, settings.breaker_cooldown) == (4, 3, 2.5)
    assert settings.data_dir == Path("/srv/r")


def test_secrets_are_hidden_in_reprs() -> None:
    settings = Settings.from_env({"RECEIVER_API_KEYS": "super-secret-key"})
    assert "super-secret-key" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECEIVER_PUBLIC_URL", "ftp://x"),
        ("RECEIVER_MAX_BODY_BYTES", "-1"),
        ("RECEIVER_RETRY_SCHEDULE", "1,-5"),
        ("RECEIVER_RETRY_SCHEDULE", "0,nan"),
        ("RECEIVER_RETRY_SCHEDULE", "5,inf"),
        ("RECEIVER_TASK_TIMEOUT", "inf"),
        ("RECEIVER_POLL_INTERVAL", "nan"),
        ("RECEIVER_ALLOW_PRIVATE_URLS", "maybe"),
        ("RECEIVER_TASK_TIMEOUT", "soon"),
        ("RECEIVER_DATABASE_URL", "mysql://x/y"),
        ("RECEIVER_DATABASE_URL", "sqlite://relative.db"),
        ("RECEIVER_DATABASE_URL", "sqlite:///:memory:"),
        ("RECEIVER_DATABASE_URL", "garbage"),
        ("RECEIVER_DATABASE_URL", "postgresql://u@h/db?schema=Audit_F"),
        ("RECEIVER_DATABASE_URL", "postgresql://u@h/db?schema=a-b"),
        ("RECEIVER_DATABASE_URL", "postgresql://u@h/db?pool_size=0"),
        ("RECEIVER_DATABASE_URL", "postgresql://u@h/db?pool_size=abc"),
        ("RECEIVER_POLL_INTERVAL", "60"),  # longer than the largest delay (30 by default)
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RECEIVER_RETRY_SCHEDULE", "0,a", "expected comma-separated non-negative seconds, e.g. 0,5,300, got 'a'"),
        ("RECEIVER_MAX_BODY_BYTES", "abc", "expected a positive integer, got 'abc'"),
        ("RECEIVER_TASK_TIMEOUT", "soon", "expected a positive number, got 'soon'"),
    ],
)
def test_bad_values_say_what_was_expected_not_pythons_words(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value) == f"{name}: {expected}"


def test_sqlite_paths() -> None:
    assert sqlite_path("sqlite:///./data/x.db") == Path("./data/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:///:memory:") is None


def test_missing_secrets_are_generated_once(tmp_path: Path) -> None:
    announced: list[str] = []
    settings = Settings.from_env({"RECEIVER_DATA_DIR": str(tmp_path)})
    first = ensure_secrets(settings, announce=announced.append)
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert [str(k) for k in first.api_keys] == [stored["api_key"]]
    assert str(first.notify_secret).startswith("whsec_")
    assert len(announced) == 1 and stored["api_key"] in announced[0]

    second = ensure_secrets(settings, announce=announced.append)
    assert [str(k) for k in second.secret_keys] == [str(k) for k in first.secret_keys]
    assert len(announced) == 1  # the key is shown only the first time


def test_only_the_secrets_not_set_are_generated(tmp_path: Path, logs) -> None:
    settings = Settings.from_env({"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_SECRET_KEY": "s"})
    ready = ensure_secrets(settings, announce=lambda _: None)
    assert sorted(json.loads((tmp_path / "secrets.json").read_text())) == ["api_key", "notify_secret"]
    assert [str(k) for k in ready.secret_keys] == ["s"]
    assert not logs.events("config.secret_generated")  # the operator's key signs: nothing to warn of


def test_secrets_that_cannot_be_stored_are_a_configuration_error(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    settings = Settings.from_env({"RECEIVER_DATA_DIR": str(blocked / "data")})
    with pytest.raises(ConfigError, match="cannot store the generated secrets"):
        ensure_secrets(settings, announce=lambda _: None)


def test_operator_secrets_win(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_API_KEYS": "mine", "RECEIVER_SECRET_KEY": "s"}
    )
    announced: list[str] = []
    ready = ensure_secrets(settings, announce=announced.append)
    assert [str(k) for k in ready.api_keys] == ["mine"] and [str(k) for k in ready.secret_keys] == ["s"]
    assert announced == []


def test_provider_signature_settings() -> None:
    defaults = Settings.from_env({})
    assert defaults.replicate_webhook_secret is None
    assert defaults.fal_jwks_url == "https://rest.alpha.fal.ai/.well-known/jwks.json" and defaults.fal_user_ids == ()
    settings = Settings.from_env(
        {
            "RECEIVER_REPLICATE_WEBHOOK_SECRET": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "RECEIVER_FAL_JWKS_URL": "http://127.0.0.1:9000/.well-known/jwks.json",
            "RECEIVER_FAL_USER_IDS": "github|1, github|2",
        }
    )
    assert str(settings.replicate_webhook_secret).startswith("whsec_")
    rotating = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD, whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert str(Settings.from_env({"RECEIVER_REPLICATE_WEBHOOK_SECRET": rotating}).replicate_webhook_secret) == rotating
    trailing = Settings.from_env({"RECEIVER_REPLICATE_WEBHOOK_SECRET": rotating + ","}).replicate_webhook_secret
    assert whsec_secrets(str(trailing)) == [part.strip() for part in rotating.split(",")]  # like the other lists
    for bad in (",", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,whsec_", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,nope!"):
        with pytest.raises(ConfigError, match="RECEIVER_REPLICATE_WEBHOOK_SECRET"):
            Settings.from_env({"RECEIVER_REPLICATE_WEBHOOK_SECRET": bad})
    notify = Settings.from_env({"RECEIVER_NOTIFY_SECRET": rotating + ","})  # every one of them signs
    assert notify.notify_secrets == tuple(part.strip() for part in rotating.split(","))
    assert Settings.from_env({"RECEIVER_NOTIFY_SECRET": NOTIFY_SECRET}).notify_secrets == (NOTIFY_SECRET,)
    assert Settings().notify_secrets == ()
    tokens = Settings.from_env({"RECEIVER_METRICS_TOKEN": "scrape-new, scrape-old"}).metrics_tokens
    assert [str(t) for t in tokens] == ["scrape-new", "scrape-old"] and Settings().metrics_tokens == ()
    for bad in (",", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,nope!"):
        with pytest.raises(ConfigError, match="RECEIVER_NOTIFY_SECRET"):
            Settings.from_env({"RECEIVER_NOTIFY_SECRET": bad})
    assert settings.fal_jwks_url == "http://127.0.0.1:9000/.well-known/jwks.json"
    assert settings.fal_user_ids == ("github|1", "github|2")
    assert Settings.from_env({"RECEIVER_FAL_JWKS_URL": "off"}).fal_jwks_url is None
    with pytest.raises(ConfigError, match="RECEIVER_FAL_JWKS_URL"):
        Settings.from_env({"RECEIVER_FAL_JWKS_URL": "jwks.json"})


def test_a_shared_database_warns_about_secrets_kept_per_instance(tmp_path: Path, logs) -> None:
    shared = Settings.from_env({"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_DATABASE_URL": "postgresql://h/db"})
    ensure_secrets(shared, announce=lambda _: None)
    assert logs.events("config.secrets_not_shared")
    explicit = shared.replace(secret_keys=(Secret("s"),), api_keys=(Secret("k"),), notify_secret=Secret("whsec_eA=="))
    logs.records.clear()
    ensure_secrets(explicit)
    assert logs.events("config.secrets_not_shared") == []
def test_provider_call_and_upload_limits() -> None:
    defaults = Settings.from_env({})
    assert defaults.router_timeout == 600 and defaults.max_upload_bytes == 64 * 1024 * 1024
    assert defaults.provider("xenodia").url == "https://api.xenodia.xyz"
    settings = Settings.from_env({"RECEIVER_ROUTER_TIMEOUT": "90", "RECEIVER_MAX_UPLOAD_BYTES": "1000",
                                  "RECEIVER_ROUTER_URL": "http://127.0.0.1:9000/"})
    assert settings.router_timeout == 90 and settings.max_upload_bytes == 1000
    assert settings.provider("router").url == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="RECEIVER_MAX_UPLOAD_BYTES"):
        Settings.from_env({"RECEIVER_MAX_UPLOAD_BYTES": "-1"})
