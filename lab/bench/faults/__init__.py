"""``pumpwatch bench faults``: proof under faults and attack.

Each scenario runs the real services (``pumpwatch ingest``, ``alerts``, ``api`` as child
processes) against a mosquitto of its own and scratch databases on loopback, injects one kind of
fault or abuse, and then checks the whole history: what was attempted, acknowledged, stored,
lost and duplicated, and whether the run is valid (every invariant held and the fault really
happened). Any lost message, or any invalid run, makes the command exit 1.

Scenarios (``--only NAME``): see ``SCENARIOS``. Sizes: ``reduced`` (CI, a few minutes in all)
and ``full`` (the figures in docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.bench.faults.common import Lab, Outcome, Size

Scenario = Callable[[Lab, Size, int], Outcome]


def _crashes(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import crashes

    return crashes.run(lab, size, seed)


def _outage(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import outage

    return outage.run(lab, size, seed)


def _broker(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import broker

    return broker.run_restart(lab, size, seed)


def _broker_kill(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import broker

    return broker.run_kill(lab, size, seed)


def _workers(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import workers

    return workers.run(lab, size, seed)


def _poison(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import poison

    return poison.run(lab, size, seed)


def _abuse(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import abuse

    return abuse.run(lab, size, seed)


def _phi(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import phi

    return phi.run(lab, size, seed)


def _strangers(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import strangers

    return strangers.run(lab, size, seed)


def _devices(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import devices

    return devices.run(lab, size, seed)


def _sbom(lab: Lab, size: Size, seed: int) -> Outcome:
    from lab.bench.faults import supply_chain

    return supply_chain.run(lab, size, seed)


SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "crashes": (_crashes, "ingest SIGKILLed at random moments mid-stream"),
    "outage": (_outage, "PostgreSQL unreachable mid-stream, ingest SIGKILLed during it"),
    "broker-restart": (_broker, "mosquitto restarted gracefully mid-stream"),
    "broker-kill": (
        _broker_kill,
        "mosquitto SIGKILLed mid-stream: lost messages recovered by backfill",
    ),
    "workers": (_workers, "alert service SIGKILLed mid-evaluation and mid-delivery"),
    "poison": (_poison, "valid messages interleaved with malformed ones"),
    "abuse": (_abuse, "huge bodies and limits, floods, slow clients against the API"),
    "phi": (_phi, "canary patient names and MRNs never in logs, metrics, fleet answers"),
    "strangers": (
        _strangers,
        "strangers cannot lock a clinic out; forwarded headers believed from trusted proxies only",
    ),
    "devices": (_devices, "a device account speaks and reads for its own pump only"),
    "sbom": (_sbom, "CycloneDX SBOM of the environment and pip-audit"),
}


@dataclass(frozen=True)
class FaultsOptions:
    size: Size = "reduced"
    only: tuple[str, ...] = ()
    seed: int = 20261124


def failed(outcomes: Sequence[Outcome]) -> bool:
    """The command's verdict: any lost message or any invalid run fails it."""
    return any((o.lost or 0) > 0 or not o.valid for o in outcomes)


def run(options: FaultsOptions, console: Console, admin_url: str | None = None) -> list[Outcome]:
    """Run the chosen scenarios (all by default) in order; print each, then the summary."""
    unknown = [name for name in options.only if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    names = list(options.only) or list(SCENARIOS)
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-faults-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        if admin_url is None:
            from lab.bench.ingest import _postgres

            admin_url = _postgres(scratch, stack)
        for name in names:
            scenario, description = SCENARIOS[name]
            console.rule(f"[bold]{name}[/bold]: {description} ({options.size})")
            started = time.monotonic()
            with contextlib.ExitStack() as own:
                lab = Lab(admin_url, scratch / name, own)
                lab.scratch.mkdir(parents=True, exist_ok=True)
                try:
                    outcome = scenario(lab, options.size, options.seed)
                except Exception as exc:  # a scenario that breaks is an invalid run, shown
                    outcome = Outcome(name, description)
                    outcome.problems.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            outcome.elapsed_s = outcome.elapsed_s or time.monotonic() - started
            outcomes.append(outcome)
            console.print(_detail(outcome))
        console.print(summary(outcomes, options))
    return outcomes


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _detail(outcome: Outcome) -> Table:
    verdict = "[green]valid[/green]" if outcome.valid else "[red]INVALID[/red]"
    table = Table(
        title=f"{outcome.scenario}: {outcome.title}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    for label, value in (
        ("attempted", outcome.attempted),
        ("acknowledged", outcome.acknowledged),
        ("stored", outcome.stored),
        ("lost", outcome.lost),
        ("duplicated", outcome.duplicated),
    ):
        if value is not None:
            table.add_row(label, _count(value))
    for label, text in outcome.figures.items():
        table.add_row(label, text)
    table.add_row("elapsed", f"{outcome.elapsed_s:.1f} s")
    table.add_row("valid", verdict)
    for problem in outcome.problems:
        table.add_row("[red]problem[/red]", problem)
    return table


def summary(outcomes: Sequence[Outcome], options: FaultsOptions) -> Table:
    table = Table(title=f"pumpwatch bench faults — size {options.size}, seed {options.seed}")
    table.add_column("scenario", no_wrap=True)
    for name in ("attempted", "acknowledged", "stored", "lost", "duplicated"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("valid", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    for o in outcomes:
        table.add_row(
            o.scenario,
            _count(o.attempted),
            _count(o.acknowledged),
            _count(o.stored),
            f"[red]{o.lost:,}[/red]" if o.lost else _count(o.lost),
            f"[red]{o.duplicated:,}[/red]" if o.duplicated else _count(o.duplicated),
            "[green]yes[/green]" if o.valid else "[red]NO[/red]",
            f"{o.elapsed_s:.0f} s",
        )
    return table
