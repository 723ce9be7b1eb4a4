"""The deployment files cannot be built here; keep them consistent by reading them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from receiver.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_fly_toml_serves_the_container_port_and_keeps_machines_running() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    service = fly["http_service"]
    assert service["internal_port"] == 8000
    assert service["auto_stop_machines"] in ("off", False)
    assert service["min_machines_running"] >= 1
    assert service["force_https"] is True
    assert any(check["path"] == "/readyz" for check in service["checks"])
    [mount] = fly["mounts"]
    assert (mount["source"], mount["destination"]) == ("receiver_data", "/data")
    assert mount.get("initial_size"), "fly deploy creates the volume on the first deploy"
    assert fly["env"]["RECEIVER_DATABASE_URL"] == "sqlite:////data/receiver.db"
    # A stop must outlast the receiver's own shutdown deadline (RECEIVER_SHUTDOWN_TIMEOUT, 10 s).
    assert fly["kill_signal"] == "SIGTERM" and fly["kill_timeout"] > Settings().shutdown_timeout


def test_dockerfile_runs_unprivileged_with_a_data_volume_and_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    final = stages[-1]
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER receiver$", final, re.M), "the final stage must not run as root"
    assert 'VOLUME ["/data"]' in final
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert "EXPOSE 8000" in final
    assert '"serve", "--host", "0.0.0.0", "--port", "8000"' in final
    assert "RECEIVER_DATABASE_URL=sqlite:////data/receiver.db" in final


def test_the_final_image_installs_prebuilt_wheels_only() -> None:
    text = (ROOT / "Dockerfile").read_text()
    *_, build, final = text.split("\nFROM ")
    assert "pip wheel" in build and "--wheel-dir /wheels" in build
    assert "--no-index" in final, "nothing may be downloaded (or compiled) in the final stage"
    assert "COPY --from=build /wheels" not in final  # bind-mounted: the wheels are not kept in a layer
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in final


def test_the_package_ships_the_dashboard_and_the_migrations() -> None:
    import tomllib as toml

    wheel = toml.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["receiver"]  # every file under receiver/, these included:
    for path in ("ui/index.html", "ui/app.js", "ui/app.css", "store/migrations/sqlite", "providers/catalog.json"):
        assert (ROOT / "receiver" / path).exists(), path
    ignored = (ROOT / ".gitignore").read_text() + (ROOT / ".dockerignore").read_text()
    assert "receiver/ui" not in ignored
