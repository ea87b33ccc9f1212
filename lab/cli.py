"""The lab's ``pumpwatch`` commands: ``demo``, ``simulate`` and ``bench …``.

Each imports what it runs when it runs, so ``pumpwatch --help`` stays fast and a runtime
without the lab's dependencies (the ``lab`` extra) says what to install."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from services import logs
from services.commands import read_settings as _settings
from services.commands import run_command as _run
from services.settings import CommonSettings, ConfigError

bench = typer.Typer(help="Benchmarks: print figures (README records them).", no_args_is_help=True)


def _require_lab() -> None:
    """End with exit code 2, saying what to install, when the lab's dependencies are missing."""
    from importlib.util import find_spec

    missing = [name for name in ("pgserver", "amqtt", "psutil", "rich") if find_spec(name) is None]
    if missing:
        typer.echo(
            f"pumpwatch: error: this command needs the lab's dependencies ({', '.join(missing)} "
            "missing): .venv/bin/uv sync --locked --inexact --extra lab",
            err=True,
        )
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add the lab's commands to the ``pumpwatch`` command line."""
    app.command()(simulate)
    app.command()(demo)
    app.add_typer(bench, name="bench")


def simulate(
    pumps: Annotated[int, typer.Option(min=1, help="Number of pumps.")] = 50,
    seed: Annotated[int, typer.Option(help="Same seed, same fleet and payloads.")] = 1,
    interval_minutes: Annotated[
        float, typer.Option(min=0.01, help="Minutes between a pump's readings.")
    ] = 15.0,
    accelerate: Annotated[
        float, typer.Option(min=1, help="Simulated seconds per wall-clock second while behind.")
    ] = 1440.0,
    backfill_days: Annotated[
        float, typer.Option(min=0, help="The fleet starts this many days before now.")
    ] = 30.0,
    rate: Annotated[float | None, typer.Option(min=0.001, help="Cap on messages/s.")] = None,
    duration: Annotated[float | None, typer.Option(min=0, help="Stop after seconds.")] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="Publish exactly N messages as fast as possible.")
    ] = None,
    fault: Annotated[
        list[str] | None, typer.Option(help="SERIAL:KIND, e.g. NGP000001A:motor_stall.")
    ] = None,
    fault_rate: Annotated[
        list[str] | None, typer.Option(help="KIND=FRACTION of the fleet, e.g. gap=0.1.")
    ] = None,
    topic_prefix: Annotated[str, typer.Option(help="Prefix before pumps/...")] = "",
    protocol: Annotated[str, typer.Option(help="MQTT protocol: 5 or 3.1.1.")] = "5",
    resend: Annotated[
        bool,
        typer.Option(
            help="Live runs: the devices hold 7 days of what they sent and answer resend "
            "commands (backfill) on pumps/+/commands."
        ),
    ] = True,
) -> None:
    """Publish simulated fleet traffic (contract messages) to the configured broker.

    Fault kinds: motor_stall, occlusion, over_infusion, missed_refill, battery, silence,
    malformed, gap (lost before the broker and not kept by the device: unrecoverable)."""
    _require_lab()
    from lab.sim.command import OptionError
    from lab.sim.command import simulate as run_simulation
    from lab.sim.publisher import PublishError

    settings = _settings(CommonSettings)
    logs.configure(settings.log_level, settings.log_format)
    if protocol not in ("5", "3.1.1"):
        typer.echo("pumpwatch: error: --protocol must be 5 or 3.1.1", err=True)
        raise typer.Exit(2)
    try:
        run_simulation(
            settings.require_mqtt(),
            pumps=pumps,
            seed=seed,
            interval_minutes=interval_minutes,
            accelerate=accelerate,
            backfill_days=backfill_days,
            rate=rate,
            duration=duration,
            count=count,
            fault=fault or (),
            fault_rate=fault_rate or (),
            topic_prefix=topic_prefix,
            protocol="5" if protocol == "5" else "3.1.1",
            resend=resend,
        )
    except (ConfigError, OptionError, PublishError) as exc:
        typer.echo(f"pumpwatch: error: {exc}", err=True)
        raise typer.Exit(2) from None


def demo(
    pumps: Annotated[
        int, typer.Option(min=1, help="Simulated pumps (a few stay unclaimed, the rest assigned).")
    ] = 44,
    seed: Annotated[
        int | None, typer.Option(help="Simulator seed (default: a new one each run).")
    ] = None,
    accelerate: Annotated[
        float, typer.Option(min=1, help="Backfill speed: simulated seconds per second.")
    ] = 86400.0,
    backfill_days: Annotated[
        float, typer.Option(min=0, help="Days of history the fleet uploads first.")
    ] = 90.0,
    data_dir: Annotated[
        str, typer.Option(help="Where the embedded servers keep their data.")
    ] = ".pumpwatch/demo",
    metrics_port: Annotated[int, typer.Option(help="Ingest /metrics and /healthz port.")] = 9101,
    alerts_metrics_port: Annotated[int, typer.Option(help="Alert engine /metrics port.")] = 9102,
    port: Annotated[int, typer.Option(help="HTTP API port.")] = 8000,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset", help="Remove the data directory first: new clinics, people and fleet."
        ),
    ] = False,
) -> None:
    """Run everything in one process, on embedded servers unless PUMPWATCH_DATABASE_URL and
    PUMPWATCH_MQTT_URL are set, with the fleet simulator and two demo clinics. Started again on
    the same data directory it resumes the same clinics and fleet. Ctrl-C stops it."""
    _require_lab()
    from pathlib import Path

    from rich.console import Console

    from lab.demo import DemoOptions
    from lab.demo import run as run_demo

    settings = _settings(CommonSettings)
    options = DemoOptions(
        pumps,
        seed,
        accelerate,
        backfill_days,
        Path(data_dir).resolve(),
        metrics_port,
        alerts_metrics_port,
        port,
        reset=reset,
    )
    # The demo's own lines (status, claim codes, gap filled) are the output: the services' info
    # logs would bury them, so only warnings and errors unless a level was asked for.
    if settings.log_level == "info":
        settings = settings.model_copy(update={"log_level": "warning"})
    _run(run_demo(options, Console()), settings)


@bench.command("ingest")
def bench_ingest(
    messages: Annotated[int, typer.Option(min=100, help="Messages in the stream.")] = 200_000,
    pumps: Annotated[int, typer.Option(min=1, help="Pumps publishing them.")] = 1000,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 7,
    publisher: Annotated[
        str,
        typer.Option(
            help="Who publishes the stream: 'paho' (the simulator's Python client) or "
            "'mosquitto_pub' (C, one process per topic), so the publisher is not the limit."
        ),
    ] = "paho",
    publisher_processes: Annotated[
        int, typer.Option(min=1, help="mosquitto_pub processes at once.")
    ] = 32,
) -> None:
    """Stored messages/s end to end vs. the broker's raw delivery rate, same stream.

    Starts its own mosquitto (project limits) and a scratch database on the configured (or
    local, or embedded) PostgreSQL, runs the real `pumpwatch ingest` process."""
    _require_lab()
    from rich.console import Console

    from lab.bench.ingest import BenchOptions
    from lab.bench.ingest import run as run_bench

    settings = _settings(CommonSettings)
    # The figures are the output: only warnings and errors besides them.
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    if publisher not in {"paho", "mosquitto_pub"}:
        raise typer.BadParameter("'paho' or 'mosquitto_pub'", param_hint="--publisher")
    run_bench(
        BenchOptions(
            messages,
            pumps,
            seed,
            "paho" if publisher == "paho" else "mosquitto_pub",
            publisher_processes,
        ),
        Console(),
    )


@bench.command("writer")
def bench_writer(
    messages: Annotated[int, typer.Option(min=1000, help="Messages in the stream.")] = 60_000,
    pumps: Annotated[int, typer.Option(min=1, help="Pumps publishing them.")] = 1000,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 7,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="LABEL=STATEMENTS.py[,SETUP.sql] (repeatable): a copy of "
            "services/ingest/sql.py, edited, stored alongside the current statements batch by "
            "batch (SETUP.sql runs on its database after the migrations); prints PostgreSQL's "
            "CPU per message of each.",
        ),
    ] = None,
) -> None:
    """Ingest's batch writer alone: CPU µs per message of judging, storing and PostgreSQL.

    The stream of `bench ingest`, judged and stored batch by batch by ingest's BatchWriter in
    this process on a scratch database, with no broker or publisher sharing the cores. With
    --variant, every batch is stored by the current statements and by each variant in turn."""
    _require_lab()
    from rich.console import Console

    settings = _settings(CommonSettings)
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    if variant:
        from lab.bench import writer_compare

        try:
            variants = [writer_compare.Variant.parse(v) for v in variant]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--variant") from exc
        writer_compare.run(messages, pumps, seed, variants, Console())
        return

    from lab.bench.writer import WriterBenchOptions
    from lab.bench.writer import run as run_bench

    run_bench(WriterBenchOptions(messages, pumps, seed), Console())


@bench.command("alerts")
def bench_alerts(
    pumps: Annotated[int, typer.Option(min=1, help="Pumps in the simulated fleet.")] = 1000,
    days: Annotated[float, typer.Option(min=1, help="Simulated days replayed.")] = 365.0,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 7,
    interval_minutes: Annotated[
        float, typer.Option(min=1, help="Minutes between a pump's readings.")
    ] = 120.0,
    chunk_hours: Annotated[
        float, typer.Option(min=0.1, help="Simulated hours per chunk (a sweep after each).")
    ] = 12.0,
    fault_share: Annotated[
        float, typer.Option(min=0, max=1, help="Share of the fleet given each fault type.")
    ] = 0.02,
    book: Annotated[
        bool, typer.Option(help="Book the refill visits the simulated clinic plans.")
    ] = True,
    latency_messages: Annotated[
        int, typer.Option(min=0, help="Messages of the latency phase (0 skips it).")
    ] = 100_000,
) -> None:
    """Detection of injected faults (ground truth) and commit-to-alert latency under load.

    Replays a simulated fleet through the real `pumpwatch ingest` and `pumpwatch alerts`
    processes on its own mosquitto and a scratch database (configured, local or embedded
    PostgreSQL), then measures the latency histogram while ingest runs at full speed."""
    _require_lab()
    from datetime import timedelta

    from rich.console import Console

    from lab.bench.alerts import AlertBenchOptions
    from lab.bench.alerts import run as run_bench

    settings = _settings(CommonSettings)
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    options = AlertBenchOptions(
        pumps=pumps,
        days=days,
        seed=seed,
        interval=timedelta(minutes=interval_minutes),
        chunk=timedelta(hours=chunk_hours),
        fault_share=fault_share,
        book=book,
        latency_messages=latency_messages,
    )
    run_bench(options, Console())


@bench.command("webhooks")
def bench_webhooks(
    messages: Annotated[int, typer.Option(min=100, help="Messages in the stream.")] = 100_000,
    pumps: Annotated[int, typer.Option(min=1, help="Pumps publishing them.")] = 1000,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 7,
    stall_share: Annotated[
        float, typer.Option(min=0, max=1, help="Share of pumps with a stalling motor.")
    ] = 0.3,
    notify_process: Annotated[
        bool,
        typer.Option(
            "--notify-process/--in-process",
            help="Deliver from a separate `pumpwatch notify` process (alerts with "
            "PUMPWATCH_NOTIFY_ENABLED=false), or on the alert service's own thread.",
        ),
    ] = True,
) -> None:
    """Alert commit → signed webhook received (p50/p99) while ingest runs at full speed.

    Runs the real `pumpwatch ingest`, `pumpwatch alerts` and (by default) `pumpwatch notify` on
    its own mosquitto and a scratch database; every pump's clinic has a webhook pointing at the
    bench's receiver (a process of its own)."""
    _require_lab()
    from rich.console import Console

    from lab.bench.webhooks import WebhookBenchOptions
    from lab.bench.webhooks import run as run_bench

    settings = _settings(CommonSettings)
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    run_bench(WebhookBenchOptions(messages, pumps, seed, stall_share, notify_process), Console())


@bench.command("api")
def bench_api(
    pumps: Annotated[int, typer.Option(min=1, help="Pumps, one patient each.")] = 1000,
    clinics: Annotated[int, typer.Option(min=1, help="Clinics the patients belong to.")] = 10,
    days: Annotated[float, typer.Option(min=1, help="Days of history seeded.")] = 365.0,
    compare_days: Annotated[
        float, typer.Option(min=0, help="History of the comparison run (0 skips it).")
    ] = 30.0,
    interval_minutes: Annotated[
        float, typer.Option(min=1, help="Minutes between a pump's readings.")
    ] = 60.0,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients per route.")] = 50,
    seconds: Annotated[float, typer.Option(min=0.1, help="Measured seconds per route.")] = 20.0,
    warmup_seconds: Annotated[
        float, typer.Option(min=0, help="Unmeasured warm-up per route.")
    ] = 2.0,
    admin_clients: Annotated[
        int, typer.Option(min=0, help="Clients of the all-pumps (admin) worklist; 0 skips it.")
    ] = 5,
    paced_rate: Annotated[
        list[float] | None,
        typer.Option(
            min=0.1,
            help="Dashboards/s offered in all by the paced clients (repeatable; default 25, 50, "
            "100 and 150): each client a Poisson stream, latency counted from when a request "
            "was due.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated fleet.")] = 7,
    worklist_pumps: Annotated[
        int,
        typer.Option(
            min=0, help="Fleet of the worklist phases (a clinic's and the admin's); 0 skips them."
        ),
    ] = 10_000,
    worklist_clinic_pumps: Annotated[
        int, typer.Option(min=1, help="Pumps per clinic in the worklist phases.")
    ] = 400,
    worklist_only: Annotated[
        bool, typer.Option(help="Only the worklist phases (not the history runs).")
    ] = False,
    fleet_sizes: Annotated[
        str,
        typer.Option(
            help="Fleet-size sweep, e.g. 1000,10000: the read routes on a fresh fleet of each "
            "size (the clinic routes on a clinic of --worklist-clinic-pumps); only the sweep runs.",
        ),
    ] = "",
    sweep_days: Annotated[
        float, typer.Option(min=0.1, help="Days of history seeded for the fleet-size sweep.")
    ] = 3.0,
    sweep_alert_days: Annotated[
        float,
        typer.Option(
            min=0, help="Days of resolved alerts the sweep adds before its history (0: none)."
        ),
    ] = 365.0,
) -> None:
    """Dashboard, worklist and telemetry latency (p50/p99) and requests/s under concurrent
    clients, on a fleet seeded with a year of readings (and with a month, for comparison).

    Seeds scratch databases with COPY on the configured (or local, or embedded) PostgreSQL,
    runs the real `pumpwatch api` process, and drives it from a separate load process."""
    _require_lab()
    from rich.console import Console

    from lab.bench.api import ApiBenchOptions
    from lab.bench.api import run as run_bench

    settings = _settings(CommonSettings)
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    options = ApiBenchOptions(
        pumps=pumps,
        clinics=clinics,
        days=days,
        compare_days=compare_days,
        interval_minutes=interval_minutes,
        clients=clients,
        seconds=seconds,
        warmup_seconds=warmup_seconds,
        admin_clients=admin_clients,
        seed=seed,
        worklist_pumps=worklist_pumps,
        worklist_clinic_pumps=worklist_clinic_pumps,
        worklist_only=worklist_only,
        fleet_sizes=_sizes(fleet_sizes),
        sweep_days=sweep_days,
        sweep_alert_days=sweep_alert_days,
    )
    if paced_rate:
        options = dataclasses.replace(options, paced_rates=tuple(paced_rate))
    report = run_bench(options, Console())
    if report.errors:
        raise typer.Exit(1)


def _sizes(text: str) -> tuple[int, ...]:
    """``1000,10000`` → (1000, 10000), ascending; empty → ()."""
    try:
        found = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        raise typer.BadParameter("comma-separated pump counts, e.g. 1000,10000") from None
    if any(n < 1 for n in found):
        raise typer.BadParameter("fleet sizes are at least 1 pump")
    return tuple(found)


@bench.command("faults")
def bench_faults(
    size: Annotated[
        str,
        typer.Option(help="reduced (CI, minutes) or full (the figures of docs/reliability.md)."),
    ] = "reduced",
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this scenario (repeatable): crashes, outage, broker-restart, "
            "broker-kill, workers, poison, abuse, phi, strangers, devices, sbom."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the streams and of the fault moments.")] = (
        20261124
    ),
) -> None:
    """Proof under faults and attack: each scenario runs the real services on loopback,
    injects its fault, and checks what was attempted, acknowledged, stored, lost and
    duplicated. Exits 1 if any message was lost or any run is invalid."""
    _require_lab()
    from rich.console import Console

    from lab.bench.faults import SCENARIOS, FaultsOptions, failed
    from lab.bench.faults import run as run_bench

    if size not in ("reduced", "full"):
        typer.echo("pumpwatch: error: --size must be reduced or full", err=True)
        raise typer.Exit(2)
    unknown = [name for name in only or [] if name not in SCENARIOS]
    if unknown:
        typer.echo(
            f"pumpwatch: error: unknown scenario {', '.join(unknown)} "
            f"(known: {', '.join(SCENARIOS)})",
            err=True,
        )
        raise typer.Exit(2)
    settings = _settings(CommonSettings)
    level = "warning" if settings.log_level == "info" else settings.log_level
    logs.configure(level, settings.log_format)
    options = FaultsOptions("full" if size == "full" else "reduced", tuple(only or ()), seed)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a log file: room for the tables' columns
    outcomes = run_bench(options, console)
    if failed(outcomes):
        raise typer.Exit(1)
