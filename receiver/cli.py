"""The `receiver` command (also `python -m receiver`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from receiver import __version__
from receiver.client import Client, ClientError, default_api_key, default_url, follow, settled
from receiver.clock import parse_iso
from receiver.config import ConfigError, Settings, ensure_secrets
from receiver.errors import StoreError
from receiver.logs import configure_logging, get_logger
from receiver.providers import CALLBACK_DIALECTS
from receiver.types import DeliveryStatus, TaskState

EPILOGS = {
    "serve": "example:\n  RECEIVER_PUBLIC_URL=https://my-tunnel.example receiver serve --port 8000\n"
    "  receiver serve --host 0.0.0.0 --forwarded-allow-ips '*'    # behind a proxy that sets X-Forwarded-*",
    "migrate": "example:\n  RECEIVER_DATABASE_URL=sqlite:////data/receiver.db receiver migrate\n"
    "  RECEIVER_DATABASE_URL='postgresql://receiver@db.internal/receiver?schema=prod' receiver migrate --json",
    "demo": "example:\n  receiver demo\n  receiver demo --json | jq -r .step",
    "doctor": "example:\n  cloudflared tunnel --url http://127.0.0.1:8000     # prints https://<name>.trycloudflare.com\n"
    "  RECEIVER_PUBLIC_URL=https://<name>.trycloudflare.com receiver serve &\n"
    "  RECEIVER_PUBLIC_URL=https://<name>.trycloudflare.com receiver doctor\n"
    "  receiver doctor --json | jq '.checks[] | select(.status != \"ok\")'\n\n"
    "Run it with the same environment as `receiver serve`. Exits 1 when a check fails.",
    "fake-provider": "example:\n  receiver fake-provider --port 9000 --delay 2 --fail-rate 0.1\n"
    "  RECEIVER_XHUOAPI_URL=http://127.0.0.1:9000 RECEIVER_XENODIA_URL=http://127.0.0.1:9000 \\\n"
    "    RECEIVER_ROUTER_URL=http://127.0.0.1:9000 receiver serve\n"
    "  URL=$(receiver callback-url --provider kling)\n"
    '  curl -s localhost:9000/_fake/callbacks/kling -d "{\\"callback_url\\": \\"$URL\\"}"\n\n'
    "Replicate and fal callbacks are signed as the real ones are; it prints the settings to verify them.",
    "callback-url": "example:\n  receiver callback-url --provider kling\n"
    "  receiver callback-url --provider auto --json | jq -r .callback_url",
    "submit": "example:\n  receiver submit --provider xhuoapi --model gpt-image-2 --prompt 'a red apple' "
    "--param size=1024x1024 --wait\n"
    "  receiver submit --provider router --model openai/gpt-image-1 --prompt 'a pear' --wait --json",
    "tasks": "example:\n  receiver tasks --state failed --limit 50\n  receiver tasks --json | jq -r '.data[].id'",
    "deliveries": "example:\n  receiver deliveries --failed\n"
    "  receiver deliveries --task tsk_0193a7c2e4f07b3c9d2e1f0a4b5c6d7e --json",
    "redeliver": "example:\n  receiver redeliver dlv_0193a7c2e5a1d3f5b7c9e1a3c5e7f9b2\n"
    "  receiver redeliver dlv_0193a7c2e5a1d3f5b7c9e1a3c5e7f9b2 --json",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"receiver: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"receiver: the database is unavailable: {exc} (RECEIVER_DATABASE_URL)", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        for field in ((error or {}).get("details") or {}).get("fields") or []:
            print(f"  {field.get('field')}: {field.get('message')}", file=sys.stderr)
        task = exc.body.get("task") if isinstance(exc.body, dict) else None
        if isinstance(task, dict) and task.get("id"):  # a provider's refusal: the task is kept, failed
            print(f"  task {task['id']} is stored as {task.get('state')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `receiver demo --json | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="receiver", description="A webhook callback receiver for asynchronous image-generation APIs."
    )
    parser.add_argument("--version", action="version", version=f"receiver {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOGS.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    def json_option(sub: argparse.ArgumentParser, help: str = "print JSON for scripts") -> None:
        sub.add_argument("--json", action="store_true", help=help)

    serve = command("serve", run_serve, "Run the service (migrates the database on start).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--workers", type=_at_least(1), default=1, help="uvicorn worker processes (default 1)")
    serve.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="proxies whose X-Forwarded-For/-Proto are trusted, comma-separated or '*' "
        "(default: RECEIVER_FORWARDED_ALLOW_IPS, else 127.0.0.1: local tunnels such as cloudflared and ngrok)",
    )
    json_option(serve, "print where it listens as one JSON line on stdout (logs are JSON on stderr anyway)")

    migrate = command("migrate", run_migrate, "Apply database migrations and exit.")
    json_option(migrate)
    demo = command("demo", run_demo, "A whole round trip on this machine, no account needed.")
    json_option(demo, "print each step as one JSON line")

    doctor = command(
        "doctor", run_doctor, "Check the configuration, and that RECEIVER_PUBLIC_URL reaches this very receiver."
    )
    doctor.add_argument("--url", default=default_url(), help="the running receiver (RECEIVER_URL)")
    doctor.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for each answer (default 10)")
    doctor.add_argument("--offline", action="store_true", help="check the configuration only, not the receiver")
    json_option(doctor)

    fake = command("fake-provider", run_fake_provider, "Run a simulated provider (no credits spent).")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    fake.add_argument("--port", type=_port, default=9000, help="port to listen on (default 9000)")
    fake.add_argument("--delay", type=_seconds, default=2.0, help="seconds before the callback is posted (default 2)")
    fake.add_argument("--fail-rate", type=_share, default=0.0, help="share of tasks that fail (0..1, default 0)")
    fake.add_argument(
        "--duplicate-rate", type=_share, default=0.0, help="share of callbacks posted twice (0..1, default 0)"
    )
    fake.add_argument(
        "--out-of-order-rate",
        type=_share,
        default=0.0,
        help="share of tasks that get a late progress callback after their result (kling, apimart; 0..1)",
    )
    fake.add_argument("--seed", type=int, default=None, help="seed the fault injection, for repeatable runs")
    fake.add_argument(
        "--replicate-secret",
        type=_whsec_arg,
        default=None,
        metavar="WHSEC",
        help="whsec_… secret to sign Replicate webhooks with (default: a new one, printed)",
    )
    json_option(fake, "print the settings that point a receiver at it as one JSON object on stdout")

    def client_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", default=default_url(), help="the receiver (RECEIVER_URL)")
        sub.add_argument("--api-key", default=None, help="API key (RECEIVER_API_KEY; default: the generated one)")
        json_option(sub)

    mint = command("callback-url", run_callback_url, "Mint a task and print its signed callback URL.")
    mint.add_argument(
        "--provider", default="auto", choices=CALLBACK_DIALECTS, help="the callback dialect (default auto)"
    )
    mint.add_argument("--expires-in", type=int, default=None, help="seconds the URL stays valid")
    client_options(mint)

    submit = command("submit", run_submit, "Submit a task through a running receiver.")
    submit.add_argument("--provider", required=True)
    submit.add_argument("--model", required=True)
    submit.add_argument("--prompt", required=True)
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a model parameter (repeatable); numbers and true/false are typed",
    )
    submit.add_argument("--notify-url", default=None)
    submit.add_argument("--idempotency-key", default=None)
    submit.add_argument("--wait", action="store_true", help="show progress until the task is done")
    client_options(submit)

    tasks = command("tasks", run_tasks, "List recent tasks.")
    tasks.add_argument("--state", choices=[s.value for s in TaskState], default=None, help="only tasks in this state")
    tasks.add_argument("--provider", default=None, help="only this provider's tasks")
    tasks.add_argument("--limit", type=int, default=20, help="how many, newest first (default 20, at most 100)")
    client_options(tasks)

    deliveries = command("deliveries", run_deliveries, "List deliveries to subscribers, newest first.")
    deliveries.add_argument("--failed", action="store_true", help="only failed deliveries (--status failed)")
    deliveries.add_argument("--status", choices=[s.value for s in DeliveryStatus], default=None)
    deliveries.add_argument("--subscription", metavar="ID", default=None, help="only this subscription")
    deliveries.add_argument("--task", metavar="ID", default=None, help="only this task")
    deliveries.add_argument("--limit", type=int, default=20, help="how many, newest first (default 20, at most 100)")
    client_options(deliveries)

    redeliver = command("redeliver", run_redeliver, "Send a delivery again now, with the same webhook-id.")
    redeliver.add_argument("id", metavar="ID", help="the delivery (dlv_…)")
    client_options(redeliver)
    return parser


# --- service commands -----------------------------------------------------------


def _number(value: str, kind: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not ok(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not {expected}")
    return number


def _port(value: str) -> int:
    return int(_number(value, int, lambda n: 1 <= n <= 65535, "a TCP port (1 to 65535)"))


def _at_least(low: int) -> Callable[[str], int]:
    return lambda value: int(_number(value, int, lambda n: n >= low, f"a whole number of at least {low}"))


def _seconds(value: str) -> float:
    return float(_number(value, float, lambda n: math.isfinite(n) and n >= 0, "a number of seconds, 0 or more"))


def _share(value: str) -> float:
    return float(_number(value, float, lambda n: 0 <= n <= 1, "a share from 0 to 1"))  # NaN fails


def _whsec_arg(value: str) -> str:
    from receiver.config import whsec

    try:
        whsec(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from receiver.app import create_app
    from receiver.context import INSTANCE_VARIABLE
    from receiver.metrics import shared_folder as metrics_shared_folder
    from receiver.protocol import server_options
    from receiver.server import Server, uvicorn_config

    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)  # first: generating secrets logs a warning
    settings = ensure_secrets(settings)
    if args.forwarded_allow_ips is not None:
        settings = settings.replace(forwarded_allow_ips=args.forwarded_allow_ips)
    try:  # before anything starts: a port already taken is one line, not a failed startup
        listening = _listen(args.host, args.port)
    except OSError as exc:
        return _cannot_listen(args, exc)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; finishing that way is a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }
    _announce_serving(args, settings)
    if args.workers > 1:
        listening.close()  # uvicorn's supervisor binds it again, for its worker processes
        if settings.database_url.startswith("sqlite:"):
            get_logger("receiver.cli").warning(
                "serve.workers_on_sqlite",
                workers=args.workers,
                advice="worker processes contend for one SQLite file and do not hear each other's changes "
                "(a long-poll waits it out): run several workers on PostgreSQL (see the README's Scaling out)",
            )
        # Secrets exist on disk by now, so every worker process reads the same ones; the instance id
        # too, so that the workers answer `receiver doctor`'s self-tests as one receiver.
        os.environ.setdefault(INSTANCE_VARIABLE, secrets.token_hex(8))
        with metrics_shared_folder():  # /metrics adds up every worker's counts (receiver.metrics)
            uvicorn.run(
                "receiver.app:app_from_env",
                factory=True,
                workers=args.workers,
                log_config=None,
                access_log=False,
                server_header=False,
                **server_options(settings),  # the same limits and shutdown deadline in every worker
                **common,
            )
        return 0
    # uvicorn_config takes the limits and shutdown deadline from the app's settings (receiver.protocol).
    app = create_app(settings)
    app.state.settles_collector = True  # a serving process (receiver.collector); tests and the demo are not
    Server(uvicorn_config(app, **common)).run(sockets=[listening])
    return 0


def _cannot_listen(args: argparse.Namespace, exc: OSError) -> int:
    print(f"receiver: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
    return 1


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` as uvicorn binds one (OSError if it cannot be)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _announce_serving(args: argparse.Namespace, settings: Settings) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    local = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else host}:{args.port}"
    if args.json:
        print(
            orjson.dumps(
                {
                    "listening": f"http://{host}:{args.port}",
                    "public_url": settings.public_url,
                    "dashboard": f"{local}/ui",
                    "workers": args.workers,
                    "forwarded_allow_ips": settings.forwarded_allow_ips,
                }
            ).decode(),
            flush=True,
        )
        return
    print(
        f"receiver {__version__} on http://{host}:{args.port} — dashboard {local}/ui\n"
        f"providers call back at {settings.public_url} (RECEIVER_PUBLIC_URL); "
        "`receiver doctor` checks the setup",
        file=sys.stderr,
        flush=True,
    )


def run_migrate(args: argparse.Namespace) -> int:
    from receiver.store import create_store, migrations

    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)

    async def migrate() -> list[str]:
        store = create_store(settings.database_url)
        await store.open()  # applies pending migrations
        try:
            return await store.migrate()
        finally:
            await store.close()

    asyncio.run(migrate())
    backend = "sqlite" if settings.database_url.startswith("sqlite:") else "postgres"
    if args.json:
        _print_json({"migrations": "current", "version": migrations.latest(backend), "backend": backend})
    else:
        print(f"migrations are current ({backend}, {migrations.latest(backend)})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from receiver.demo import run

    # The demo narrates every step itself; of the receiver's own log only errors matter here (a
    # warning such as an unset provider webhook secret is about a deployment, not the demo), and
    # those as JSON lines on stderr, not the bare event names Python prints unconfigured.
    configure_logging("error")
    return asyncio.run(run(json_lines=args.json))


def run_doctor(args: argparse.Namespace) -> int:
    from receiver.doctor import diagnose

    report = asyncio.run(diagnose(os.environ, url=args.url, timeout=args.timeout, self_test=not args.offline))
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.text())
    return 0 if report.ok else 1


def run_fake_provider(args: argparse.Namespace) -> int:
    import uvicorn

    from receiver.fakes.provider import FakeProvider
    from receiver.server import uvicorn_config

    configure_logging("info")
    try:  # before printing settings that point at it: a port already taken is one line
        listening = _listen(args.host, args.port)
    except OSError as exc:
        return _cannot_listen(args, exc)
    fake = FakeProvider(
        delay=args.delay,
        fail_rate=args.fail_rate,
        duplicate_rate=args.duplicate_rate,
        out_of_order_rate=args.out_of_order_rate,
        seed=args.seed,
        replicate_secret=args.replicate_secret,
    )
    base = f"http://{args.host}:{args.port}"
    if args.json:
        env = {f"RECEIVER_{name}_URL": base for name in ("XHUOAPI", "XENODIA", "ROUTER", "REPLICATE")}
        env["RECEIVER_REPLICATE_WEBHOOK_SECRET"] = fake.signed.replicate_secret
        env["RECEIVER_FAL_URL"] = f"{base}/fal"
        env["RECEIVER_FAL_JWKS_URL"] = f"{base}/.well-known/jwks.json"
        _print_json({"url": base, "env": env, "callbacks": f"{base}/_fake/callbacks/{{dialect}}"})
    print(
        f"fake provider on {base}; point the receiver at it with:\n"
        f"  RECEIVER_XHUOAPI_URL={base}\n"
        f"  RECEIVER_XENODIA_URL={base}\n"
        f"  RECEIVER_ROUTER_URL={base}\n"
        f"  RECEIVER_REPLICATE_URL={base}\n"
        f"  RECEIVER_REPLICATE_WEBHOOK_SECRET={fake.signed.replicate_secret}\n"
        f"  RECEIVER_FAL_URL={base}/fal\n"
        f"  RECEIVER_FAL_JWKS_URL={base}/.well-known/jwks.json\n"
        f"kie, kling, apimart callbacks: POST {base}/_fake/callbacks/<dialect>"
        ' {"callback_url": "<receiver callback-url --provider <dialect>>"}',
        file=sys.stderr,
    )
    uvicorn.Server(uvicorn_config(fake.app, host=args.host, port=args.port)).run(sockets=[listening])
    return 0


# --- client commands --------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key or default_api_key(os.environ))


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def run_callback_url(args: argparse.Namespace) -> int:
    with _client(args) as api:
        minted = api.callback_url(args.provider, expires_in=args.expires_in)
    if args.json:
        _print_json(minted)
    else:
        print(f"task:         {minted['task']['id']}", file=sys.stderr)
        print(minted["callback_url"])
    return 0


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def run_submit(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"provider": args.provider, "model": args.model, "prompt": args.prompt}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"receiver: --param takes NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        body[name] = _typed(value)
    if args.notify_url:
        body["notify_url"] = args.notify_url
    with _client(args) as api:
        try:
            task = api.submit(body, idempotency_key=args.idempotency_key)
        except ClientError as exc:
            if args.json and exc.body is not None:
                _print_json(exc.body)
            raise
        if args.wait:
            task = _follow(api, task, quiet=args.json)
    if args.json:
        _print_json(task)
    else:
        _print_task(task)
    return 0 if task["state"] not in ("failed", "expired", "cancelled") else 1


def _follow(api: Client, task: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Follow the task's events until it is settled, with a live progress line (state, elapsed time)."""
    return asyncio.run(_follow_live(api, task, quiet=quiet))


async def _follow_live(api: Client, task: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    started = time.monotonic()
    live = sys.stderr.isatty() and not quiet
    latest, shown = task, None

    def show() -> None:
        nonlocal shown
        state = latest["state"]
        if latest["state"] == "succeeded" and not settled(latest):
            state = "succeeded, keeping images…"
        if quiet or (not live and state == shown):
            return
        line = f"{latest['id']}  {state:<28} {time.monotonic() - started:6.1f}s"
        print(f"\r{line}" if live else line, end="" if live else "\n", file=sys.stderr, flush=True)
        shown = state

    async def read() -> None:
        nonlocal latest
        async for change in follow(api.base_url, api.api_key, task["id"]):
            latest = change
            show()

    reader = asyncio.create_task(read())
    show()
    while not reader.done():
        await asyncio.wait({reader}, timeout=0.2)
        if live:
            show()  # the elapsed time moves on
    reader.result()
    if live:
        print(file=sys.stderr)
    return latest


def _print_task(task: dict[str, Any]) -> None:
    print(f"{task['id']}  {task['state']}  {task['provider']}/{task.get('model') or '-'}")
    for index, image in enumerate((task.get("result") or {}).get("images", [])):
        print(f"  {image.get('asset_url') or image.get('url')}")
        if image.get("asset_error"):
            error = image["asset_error"]
            print(f"    (image {index} not kept: {error.get('code')}: {error.get('message')})", file=sys.stderr)
    if task.get("error"):
        print(f"  error: {task['error'].get('code')}: {task['error'].get('message')}")


def run_tasks(args: argparse.Namespace) -> int:
    with _client(args) as api:
        page = api.tasks(state=args.state, provider=args.provider, limit=args.limit)
    header = ("ID", "STATE", "PROVIDER", "MODEL", "IMAGES", "AGE", "UPSTREAM")
    return _print_page(args, page, header, _task_row, "(no tasks)")


def _task_row(t: dict[str, Any]) -> tuple[str, ...]:
    return (
        t["id"],
        t["state"],
        t["provider"],
        t.get("model") or "-",
        _images(t),
        _age(t["created_at"]),
        t.get("upstream_task_id") or "-",
    )


def _images(task: dict[str, Any]) -> str:
    """`2 kept`, `1 keeping…`, `1` (not kept), `-`."""
    result = task.get("result") or {}
    images = result.get("images") or []
    if not images:
        return "-"
    if result.get("mirror") == "pending":
        return f"{len(images)} keeping…"
    kept = sum(bool(image.get("asset_url")) for image in images)
    return (
        f"{len(images)} kept" if kept == len(images) else (f"{len(images)} ({kept} kept)" if kept else str(len(images)))
    )


def _age(iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = max(0.0, time.time() - parse_iso(iso))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def run_deliveries(args: argparse.Namespace) -> int:
    status = "failed" if args.failed else args.status
    with _client(args) as api:
        page = api.deliveries(status=status, subscription_id=args.subscription, task_id=args.task, limit=args.limit)
    header = ("ID", "STATUS", "EVENT", "TASK", "SUBSCRIPTION", "ATTEMPTS", "LAST", "UPDATED")
    return _print_page(args, page, header, _delivery_row, "(no deliveries)")


def _delivery_row(d: dict[str, Any]) -> tuple[str, ...]:
    return (
        d["id"],
        d["status"],
        d["event_type"],
        d.get("task_id") or "-",
        d["subscription_id"],
        str(d["attempt_count"]),
        _last_attempt(d),
        _age(d["updated_at"]),
    )


def _last_attempt(delivery: dict[str, Any]) -> str:
    if not delivery.get("attempts"):
        return "-"
    last = delivery["attempts"][-1]
    shown = str(last["status_code"]) if last.get("status_code") is not None else (last.get("error") or "?")
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return f"{shown} ({last['latency_ms']:.0f} ms)" if last.get("latency_ms") is not None else shown


def run_redeliver(args: argparse.Namespace) -> int:
    with _client(args) as api:
        delivery = api.redeliver(args.id)
    if args.json:
        _print_json(delivery)
    else:
        print(f"{delivery['id']}  {delivery['status']}: queued to be sent again (webhook-id {delivery['event_id']})")
    return 0


def _print_page(
    args: argparse.Namespace,
    page: dict[str, Any],
    header: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[str]],
    nothing: str,
) -> int:
    """A list answer: as it came with --json, else a table (and `nothing` on stderr when empty)."""
    if args.json:
        _print_json(page)
        return 0
    rows = [row(item) for item in page["data"]]
    _print_table(header, rows)
    if not rows:
        print(nothing, file=sys.stderr)
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
