"""`camfleet up`: the whole stack on one machine, with embedded defaults."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import time

import typer

# (name, CLI module that must exist, argv after `camfleet`)
SERVICES = [
    (
        "assembler",
        "camfleet.commands.assembler",
        ["assembler", "--health-port", "{h_assembler}", "--metrics-port", "{m_assembler}"],
    ),
    ("api", "camfleet.commands.api", ["api", "--host", "{api_host}", "--port", "{api_port}"]),
    (
        "signer",
        "camfleet.commands.signer",
        ["signer", "--health-port", "{h_signer}", "--metrics-port", "{m_signer}"],
    ),
]
# Where each service says it is ready; the fleet-health flow checks them (docs/alerts.md).
READY_PATHS = {"assembler": "/readyz", "api": "/health", "signer": "/ready"}
DEPLOYMENTS = ("deployments", "deployments.serve", None)
DEMO = [("demo", "camfleet.demo", None)]
# The demo runs replicas of the MQTT services, so a newcomer sees them share the fleet
# (leases in PostgreSQL, docs/scaling.md); --assemblers / --signers still override.
DEMO_REPLICAS = 2


def metrics_ports(api_port: int) -> dict[str, int]:
    """Prometheus ports of the assembler and the signer: the API's port + 1 and + 2 when
    free (predictable for a scrape config), else ones the OS picks; the API serves its
    own /metrics. Services bind loopback only."""
    from camfleet.localsvc import free_port
    from camfleet.stack import _port_free

    ports: dict[str, int] = {}
    for offset, name in enumerate(("assembler", "signer"), start=1):
        wanted = api_port + offset
        free = wanted <= 65535 and wanted not in ports.values() and _port_free(wanted)
        ports[name] = wanted if free else free_port()
    return ports


def signer_replicas(
    services: list, n: int, health: dict[str, int], metrics: dict[str, int] | None = None
) -> list:
    """`services` with the signer as `n` replicas of one share group, each with its own
    MQTT client id (docs/edge-upload.md, replicas); the first keeps the signer's health
    and metrics ports (fleet-health checks it), the others get free ones, added to
    `health` and `metrics` (the banner's scrape list)."""
    metrics = {} if metrics is None else metrics
    if n <= 1:
        return services
    from camfleet.localsvc import free_port

    out = []
    for name, module, args in services:
        if name != "signer":
            out.append((name, module, args))
            continue
        for i in range(1, n + 1):
            if i == 1:
                own = args
            else:
                name = f"signer-{i}"
                health[name] = free_port()
                metrics[name] = free_port()
                own = ["signer", "--metrics-port", str(metrics[name])]
                own += ["--health-port", str(health[name])]
            own = [*own, "--share-group", "camfleet-signer", "--client-id", f"camfleet-signer-{i}"]
            out.append(("signer" if i == 1 else name, module, own))
    return out


def assembler_replicas(
    n: int, metrics: dict[str, int], health: dict[str, int] | None = None
) -> list[tuple[str, str, list[str]]]:
    """`--assemblers N`: N replicas leasing device partitions (docs/mqtt-ingest.md,
    "Several assemblers"); 1 is the single assembler of today, without leases. Replica 1
    keeps the assembler's health and metrics ports (fleet-health checks it); replica
    k > 1 gets free ones, added to `metrics` and `health`."""
    health = {} if health is None else health
    if n <= 1:
        return [SERVICES[0]]
    from camfleet.localsvc import free_port
    from services.assembler.partitions import DEFAULT_PARTITIONS

    out = []
    for k in range(1, n + 1):
        name = "assembler" if k == 1 else f"assembler-{k}"
        if k == 1:
            args = list(SERVICES[0][2])
        else:
            port = metrics.setdefault(name, free_port())
            health[name] = free_port()
            args = ["assembler", "--health-port", str(health[name]), "--metrics-port", str(port)]
        args += ["--partitions", str(DEFAULT_PARTITIONS), "--replica-id", f"up-{k}"]
        out.append((name, SERVICES[0][1], args))
    return out


def replica_counts(demo: bool, assemblers: int | None, signers: int | None) -> tuple[int, int]:
    """Replicas of the assembler and the signer: as asked, else 1 (2 with the demo)."""
    default = DEMO_REPLICAS if demo else 1
    return assemblers or default, signers or default


def service_urls(api_host: str, api_port: int, health_ports: dict[str, int]) -> dict[str, str]:
    """Readiness URLs of the services up starts, for fleet-health's service alerts: the
    API where it listens (a wildcard address is reached on loopback), the assembler's
    and the signer's health ports on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(api_host, api_host)  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    urls = {"api": f"http://{host}:{api_port}{READY_PATHS['api']}"}
    for name, port in health_ports.items():
        kind = name.split("-", 1)[0]  # replica k of a service: "assembler-2"
        urls[name] = f"http://127.0.0.1:{port}{READY_PATHS[kind]}"
    return urls


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# What other terminals need to reach the stack (camfleet/stackfile.py); the server
# secret stays in its own file (<data dir>/secret_key), which commands already read.
SHARED_SETTINGS = (
    "DATABASE_URL",
    "STORAGE_URL",
    "MQTT_HOST",
    "MQTT_PORT",
    "MQTT_TLS",
    "MQTT_USERNAME",
    "MQTT_PASSWORD",
    "PREFECT_API_URL",
    "CAMFLEET_API_HOST",
    "CAMFLEET_API_PORT",
    "CAMFLEET_PUBLIC_URL",
    "CAMFLEET_SERVICE_URLS",
)


def up(
    demo: bool = typer.Option(False, help="Also run simulated devices of every kind."),
    api_port: int = typer.Option(
        None, envvar="CAMFLEET_API_PORT", help="Port of the device API [default: 8000]."
    ),
    prefect_port: int = typer.Option(
        4200, envvar="CAMFLEET_PREFECT_PORT", help="Port of the local Prefect server/UI."
    ),
    mqtt_port: int = typer.Option(
        1883, envvar="CAMFLEET_MQTT_PORT", help="Port of the local MQTT broker."
    ),
    check: bool = typer.Option(
        False, help="Bring up databases and broker, print the status, and exit."
    ),
    assemblers: int = typer.Option(
        None,
        min=1,
        help="MQTT assembler replicas, leasing device partitions when more than 1 "
        f"(default 1; {DEMO_REPLICAS} with --demo).",
        show_default=False,
    ),
    signers: int = typer.Option(
        None,
        min=1,
        help="`camfleet signer` replicas sharing the edge devices' requests "
        f"(default 1; {DEMO_REPLICAS} with --demo).",
        show_default=False,
    ),
) -> None:
    """Start everything: Prefect server, migrations, blocks, deployments, services."""
    from camfleet import prefect_profile, stackfile
    from camfleet.localsvc import free_port
    from camfleet.settings import get_settings
    from camfleet.stack import LocalStack, StackError
    from camfleet.supervisor import Supervisor
    from deployments.automations import HEARTBEAT_S

    settings = get_settings()
    api_port = api_port or settings.api_port
    assemblers, signers = replica_counts(demo, assemblers, signers)
    stack = LocalStack(settings, prefect_port=prefect_port, mqtt_port=mqtt_port)
    running = stackfile.read(stack.data_dir)
    if running:
        typer.secho(
            f"camfleet up: already running for {stack.data_dir} (pid {running['pid']}); "
            "stop it first, or set CAMFLEET_DATA_DIR for a second stack",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    problems = stack.port_problems(prefect=not check, api_port=None if check else api_port)
    if problems:
        for line in problems:
            typer.secho(f"camfleet up: {line}", fg="red", err=True)
        raise typer.Exit(2)
    # Ctrl-C (even when started from a shell that ignores SIGINT in the background) and
    # SIGTERM both stop what was started, including while infrastructure starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    supervisor = Supervisor(settings.data_dir.resolve() / "logs")
    profile_restore: list[str | None] = []
    try:
        try:
            stack.start(prefect=not check)
        except StackError as exc:
            typer.secho(f"camfleet up: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
        public_url = settings.public_url or f"http://{settings.api_host}:{api_port}"
        env = {
            **stack.env,
            "CAMFLEET_PUBLIC_URL": public_url,
            "CAMFLEET_API_HOST": settings.api_host,
            "CAMFLEET_API_PORT": str(api_port),
        }
        # Flow runs send heartbeats, so the zombie automation can crash dead ones.
        if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
            env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)
        if not check:
            _register_blocks(env)
            metrics = metrics_ports(api_port)
            fmt = {"api_host": settings.api_host, "api_port": str(api_port)}
            fmt |= {f"m_{name}": str(port) for name, port in metrics.items()}
            started = [name for name, module, _ in SERVICES if _available(module)]
            health = {name: free_port() for name in ("assembler", "signer") if name in started}
            fmt |= {f"h_{name}": str(port) for name, port in health.items()}
            urls = service_urls(settings.api_host, api_port, health)
            env["CAMFLEET_SERVICE_URLS"] = json.dumps({n: urls[n] for n in started})
            replica_health: dict[str, int] = {}
            planned = assembler_replicas(assemblers, metrics, replica_health)
            planned += signer_replicas(SERVICES[1:], signers, replica_health, metrics)
            planned += [DEPLOYMENTS] + (DEMO if demo else [])
            for name, module, args in planned:
                if not _available(module):
                    continue
                if args is None:
                    argv = [sys.executable, "-m", module]
                else:
                    argv = [sys.executable, "-m", "camfleet.cli", *[a.format(**fmt) for a in args]]
                supervisor.start(name, argv, env)
            ready_urls = {
                **urls,
                **service_urls(settings.api_host, api_port, replica_health),
            }
            ready_urls = {n: u for n, u in ready_urls.items() if n in supervisor.names()}
            stack.lines.append(("device API", f"{public_url}  (docs: {public_url}/docs)"))
            stack.lines.append(("console", f"{public_url}/console  (docs/console.md)"))
            stack.lines.append(("logs", str(supervisor.log_dir)))
            scrape = [f"api {public_url}/metrics"]
            scrape += [f"{n} http://127.0.0.1:{p}/metrics" for n, p in metrics.items()]
            stack.lines.append(("metrics", ", ".join(scrape) + "  (docs/metrics.md)"))
            try:
                profile_restore.append(prefect_profile.activate(env["PREFECT_API_URL"]))
            except (OSError, ValueError) as exc:  # e.g. a read-only home directory
                typer.secho(
                    f"camfleet up: could not activate the `camfleet` Prefect profile "
                    f"({type(exc).__name__}); in other terminals export "
                    f"PREFECT_API_URL={env['PREFECT_API_URL']}",
                    fg="yellow",
                    err=True,
                )
            stackfile.write(
                stack.data_dir,
                {
                    **stackfile.process_identity(),
                    "broker_pid": stack.broker_pid,
                    "broker": "mqtt://{}:{}".format(
                        env.get("MQTT_HOST", settings.mqtt_host),  # MQTT_HOST: the user's own
                        env.get("MQTT_PORT", settings.mqtt_port),
                    ),
                    "env": {k: env[k] for k in SHARED_SETTINGS if k in env},
                },
            )
        _banner(stack, supervisor)
        if check:
            _print_status(stack.dsn)
            return
        _wait_ready(supervisor, ready_urls)
        _next_steps(stack.data_dir)
        typer.echo("camfleet is up. Ctrl-C stops everything.")
        while True:
            for line in supervisor.poll():
                typer.echo(line)
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("\nstopping...")
    finally:
        stackfile.remove(stack.data_dir)
        if profile_restore:
            with contextlib.suppress(OSError, ValueError):
                prefect_profile.restore(profile_restore[0])
        supervisor.stop_all()
        stack.stop()
        typer.echo("stopped.")


def _wait_ready(supervisor, urls: dict[str, str]) -> None:
    """Print "camfleet is up" only once a device sending then is served
    (camfleet/readiness.py); after READY_TIMEOUT_S, say what is not ready and where
    its log is instead of waiting for ever."""
    from camfleet.readiness import READY_TIMEOUT_S, wait_ready

    if not urls:
        return
    typer.echo(f"waiting for {', '.join(urls)} to be ready...")

    def tick() -> None:
        for line in supervisor.poll():
            typer.echo(line)

    waiting = wait_ready(urls, tick=tick)
    if waiting:
        typer.secho(
            f"not ready after {READY_TIMEOUT_S:g} s: {', '.join(waiting)} "
            f"(logs in {supervisor.log_dir})",
            fg="yellow",
            err=True,
        )


def _next_steps(data_dir) -> None:
    """What to run in another terminal: those commands find this stack unexported."""
    here = os.path.abspath(".camfleet")
    prefix = "" if str(data_dir) == here else f"CAMFLEET_DATA_DIR={data_dir} "
    typer.echo("In another terminal (nothing to export; the `camfleet` Prefect profile is active):")
    typer.echo("  .venv/bin/prefect deployment run 'fleet-report/fleet-report'")
    typer.echo("  .venv/bin/prefect flow-run ls")
    typer.echo(f"  {prefix}.venv/bin/camfleet simulate esp32 --devices 2")
    typer.echo(f"  {prefix}.venv/bin/camfleet report")


def _register_blocks(env: dict[str, str]) -> None:
    """Block types, plus `default` blocks for what this stack runs (none hold a default secret)."""
    import os

    os.environ.update(env)
    from camfleet.commands.blocks import blocks_from_env
    from camfleet.settings import get_settings

    get_settings.cache_clear()
    import blocks

    for name in blocks.__all__:
        getattr(blocks, name).register_type_and_schema()
    for block in blocks_from_env().values():
        block.save("default", overwrite=True)
    _ensure_automations()


def _ensure_automations() -> None:
    """Crash detection for runs whose process died (deployments/automations.py), and
    the fleet alerts once an alert block exists (deployments/alerts.py, docs/alerts.md)."""
    import anyio
    from prefect.client.orchestration import get_client

    from deployments.alerts import ensure_alert_automations
    from deployments.automations import ensure_automations

    async def run() -> None:
        async with get_client() as client:
            await ensure_automations(client)
            await ensure_alert_automations(client)

    anyio.run(run)


def _banner(stack, supervisor) -> None:
    typer.echo("=" * 64)
    typer.echo("camfleet - camera fleet ingestion")
    typer.echo("=" * 64)
    for label, value in stack.lines:
        typer.echo(f"{label + ':':<12} {value}")
    for child in supervisor.children:
        typer.echo(f"{'running:':<12} {child.name} (pid {child.proc.pid})")
    typer.echo("=" * 64)


def _print_status(dsn: str) -> None:
    from camfleet.commands.status import print_status

    print_status(dsn)


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("up")(up)
