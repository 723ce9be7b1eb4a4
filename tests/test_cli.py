from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from receiver import cli
from receiver.client import ClientError
from tests.conftest import API_KEY, start_receiver


def test_refused_parameters_are_listed_field_by_field(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    body = {"error": {"code": "invalid_parameters", "message": "Invalid parameters: resolution, n.",
                      "details": {"fields": [{"field": "resolution", "message": "with aspect_ratio auto, only 1K"},
                                             {"field": "n", "message": "must be one of: 1"}]}}}

    def refused(args) -> int:
        raise ClientError("invalid_parameters: Invalid parameters: resolution, n.", status=400, body=body)

    monkeypatch.setattr(cli, "run_submit", refused)
    assert cli.main(["submit", "--provider", "xenodia", "--model", "gpt-image-2", "--prompt", "p"]) == 1
    assert capsys.readouterr().err.splitlines()[1:] == ["  resolution: with aspect_ratio auto, only 1K",
                                                        "  n: must be one of: 1"]


def test_a_provider_refusal_names_the_failed_task_it_stored(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    body = {"error": {"code": "upstream_billing", "message": "The provider refused: billing."},
            "task": {"id": "tsk_0193", "state": "failed"}}

    def refused(args) -> int:
        raise ClientError("upstream_billing: The provider refused: billing.", status=502, body=body)

    monkeypatch.setattr(cli, "run_submit", refused)
    assert cli.main(["submit", "--provider", "xhuoapi", "--model", "gpt-image-2", "--prompt", "p"]) == 1
    assert capsys.readouterr().err.splitlines() == ["receiver: upstream_billing: The provider refused: billing.",
                                                    "  task tsk_0193 is stored as failed"]


# --- every command: --help with an example, --json ----------------------------------------------


def test_every_command_has_an_example_and_json_output(capsys) -> None:
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"doctor", "serve", "submit", "tasks", "deliveries"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        assert "example:" in (sub.epilog or ""), name
        assert any("--json" in action.option_strings for action in sub._actions), name
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0 and "example:" in capsys.readouterr().out


def test_help_names_every_value_the_api_takes(capsys) -> None:
    """`--provider`, `--state` and `--status` offer what the API accepts, and refuse anything else locally."""
    from receiver.providers import CALLBACK_DIALECTS

    with pytest.raises(SystemExit):
        cli.main(["callback-url", "--help"])
    shown = capsys.readouterr().out
    assert all(dialect in shown for dialect in CALLBACK_DIALECTS) and "replicate" in shown and "fal" in shown
    for argv in (["callback-url", "--provider", "nope"], ["tasks", "--state", "done"]):
        with pytest.raises(SystemExit) as refused:
            cli.main(argv)
        assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- against a running receiver -----------------------------------------------------------------


def columns(table: str) -> list[list[str]]:
    """Each line cut where the header's columns start; fails if a row's cell does not start there."""
    lines = table.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", lines[0])]
    cut = []
    for line in lines:
        for start in starts[1:]:
            assert line[start - 1] == " " and line[start] != " ", f"not aligned at {start}: {line!r}"
        cut.append([line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)])
    return cut


@pytest.mark.anyio
async def test_submit_wait_shows_progress_and_ends_with_the_kept_images(
    tmp_path: Path, fake_provider, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_receiver(tmp_path, provider_url=fake_provider[1], mirror_assets=True) as running:
        client = ["--url", running.url, "--api-key", API_KEY]
        submit = ["submit", "--provider", "xhuoapi", "--model", "nano-banana", "--prompt", "a pear", "--wait"]
        assert await asyncio.to_thread(cli.main, [*submit, *client]) == 0
        out, err = capsys.readouterr()
        [line, image] = out.splitlines()
        assert line.split()[1:] == ["succeeded", "xhuoapi/nano-banana"]
        assert image.strip().startswith(f"{running.url}/assets/")  # the kept copy, not the provider's URL
        progress = err.splitlines()
        assert progress[0].split()[1] == "submitted" and progress[-1].split()[1] == "succeeded"
        assert all(re.search(r"\d+\.\d+s$", p) for p in progress)  # with the elapsed time

        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: one line, redrawn in place
        assert await asyncio.to_thread(cli.main, [*submit, *client]) == 0
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.count("\r") >= 2 and "succeeded" in err.rsplit("\r", 1)[1]

        assert await asyncio.to_thread(cli.main, [*submit, *client, "--json"]) == 0
        out, err = capsys.readouterr()
        task = json.loads(out)
        assert task["state"] == "succeeded" and task["result"]["mirror"] == "done" and err == ""

        assert await asyncio.to_thread(cli.main, ["tasks", *client]) == 0
        table = columns(capsys.readouterr().out)
        assert table[0] == ["ID", "STATE", "PROVIDER", "MODEL", "IMAGES", "AGE", "UPSTREAM"]
        assert [row[1] for row in table[1:]] == ["succeeded"] * 3 and table[1][4] == "1 kept"
        assert re.fullmatch(r"\d+s", table[1][5])
        assert await asyncio.to_thread(cli.main, ["tasks", *client, "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["data"]) == 3


@pytest.mark.anyio
async def test_deliveries_lists_the_log_and_redeliver_sends_one_again(tmp_path: Path, capsys) -> None:
    from tests.delivery.helpers import FAST, deliveries, eventually, subscribe

    async with start_receiver(tmp_path, **{**FAST, "retry_schedule": (0.0,)}) as running:
        client = ["--url", running.url, "--api-key", API_KEY]
        sub = await subscribe(running, "http://127.0.0.1:9/hook")  # nothing listens: the one attempt fails
        assert (await running.api.post(f"/v1/subscriptions/{sub['id']}/test")).status_code == 202
        [failed] = await eventually(lambda: deliveries(running, status="failed"), what="a failed ping")

        assert await asyncio.to_thread(cli.main, ["deliveries", *client, "--failed"]) == 0
        table = columns(capsys.readouterr().out)
        assert table[0] == ["ID", "STATUS", "EVENT", "TASK", "SUBSCRIPTION", "ATTEMPTS", "LAST", "UPDATED"]
        assert table[1][:6] == [failed["id"], "failed", "ping", "-", sub["id"], "1"] and len(table) == 2
        assert await asyncio.to_thread(cli.main, ["deliveries", *client, "--status", "succeeded"]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and "(no deliveries)" in err
        assert await asyncio.to_thread(cli.main, ["deliveries", *client, "--json"]) == 0
        assert [d["id"] for d in json.loads(capsys.readouterr().out)["data"]] == [failed["id"]]

        assert await asyncio.to_thread(cli.main, ["redeliver", *client, failed["id"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == failed["id"]

        async def sent_again() -> list[object]:
            return [d for d in await deliveries(running, status="failed") if d["attempt_count"] == 2]

        await eventually(sent_again, what="the second attempt")
        assert await asyncio.to_thread(cli.main, ["redeliver", *client, "dlv_nope"]) == 1
        assert "delivery_not_found" in capsys.readouterr().err


# --- arguments, configuration and the database, refused in plain words ----------------------------


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "99999"], ["serve", "--port", "0"], ["serve", "--workers", "0"],
    ["fake-provider", "--port", "70000"], ["fake-provider", "--fail-rate", "2"],
    ["fake-provider", "--duplicate-rate", "nan"], ["fake-provider", "--delay", "-1"],
    ["doctor", "--timeout", "inf"],
])
def test_out_of_range_arguments_are_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert f"argument {argv[1]}: '{argv[2]}' is not" in capsys.readouterr().err


def test_migrate_names_a_database_it_cannot_open(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # leave this process's logging be
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("RECEIVER_DATABASE_URL", f"sqlite:///{blocked}/receiver.db")
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("receiver: the database is unavailable: cannot create the database in")
    assert "Traceback" not in err
    monkeypatch.setenv("RECEIVER_DATABASE_URL", "mysql://db/receiver")
    assert cli.main(["migrate"]) == 2
    assert "configuration error: RECEIVER_DATABASE_URL" in capsys.readouterr().err


@pytest.mark.anyio
async def test_callback_url_passes_every_lifetime_it_is_given(tmp_path: Path, capsys) -> None:
    async with start_receiver(tmp_path) as running:
        client = ["--url", running.url, "--api-key", API_KEY]
        # 0 is not "the default": the receiver refuses it, as it does any lifetime under a minute.
        assert await asyncio.to_thread(cli.main, ["callback-url", *client, "--expires-in", "0"]) == 1
        assert "expires_in" in capsys.readouterr().err


def test_ids_cannot_reach_another_route() -> None:
    from receiver.client import Client

    seen: list[str] = []

    def record(request):
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"error": {"code": "delivery_not_found", "message": "no"}})

    with Client("http://receiver.test", "k") as api:
        api._http = httpx.Client(base_url="http://receiver.test", transport=httpx.MockTransport(record))
        with pytest.raises(ClientError):
            api.redeliver("a/../x")
        with pytest.raises(ClientError):
            api.task("../deliveries")
    assert seen == ["/v1/deliveries/a%2F..%2Fx/retry", "/v1/tasks/..%2Fdeliveries"]


@pytest.mark.anyio
async def test_following_a_task_gives_up_on_a_receiver_that_is_gone() -> None:
    from receiver.client import follow

    with pytest.raises(ClientError, match="lost the receiver"):
        async for _ in follow("http://127.0.0.1:9", "k", "tsk_1", give_up_after=0.3, retry_every=0.05):
            pass


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [pytest.param(200, "text/html", b"<html>a tunnel's warning page</html>", id="html"),
     pytest.param(200, "application/json", b'{"ok": true}', id="json-of-another-shape"),
     pytest.param(200, "application/json", b"[1, 2]", id="json-not-an-object"),
     pytest.param(404, "text/plain", b"Not Found", id="another-servers-404"),
     pytest.param(502, "application/json", b'{"detail": "bad gateway"}', id="a-proxys-502")],
)
def test_a_server_that_is_not_the_receiver_is_named_not_a_traceback(status: int, content_type: str, body: bytes,
                                                                    capsys) -> None:
    """RECEIVER_URL at a wrong port, a tunnel's interstitial or a proxy answers 200 with something else."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Impostor(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ["--url", f"http://127.0.0.1:{server.server_port}", "--api-key", "k"]
        for argv in (["tasks"], ["deliveries"], ["redeliver", "dlv_1"], ["callback-url"],
                     ["submit", "--provider", "xhuoapi", "--model", "gpt-image-2", "--prompt", "p"]):
            assert cli.main([argv[0], *client, *argv[1:]]) == 1, argv
            err = capsys.readouterr().err
            assert ("is not the receiver" in err or "is RECEIVER_URL the receiver?" in err), (argv, err)
            assert "Traceback" not in err and err.count("\n") == 1, (argv, err)
    finally:
        server.shutdown()
        server.server_close()


def test_serve_on_a_port_already_taken_says_so_before_starting(tmp_path: Path, monkeypatch, capsys) -> None:
    import socket

    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # leave this process's logging be
    monkeypatch.setenv("RECEIVER_DATABASE_URL", f"sqlite:///{tmp_path}/receiver.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err
        assert not (tmp_path / "receiver.db").exists()  # nothing was migrated
        # The fake provider too, before it prints a secret no fake on that port signs with.
        assert cli.main(["fake-provider", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "whsec_" not in err
