"""The patient report (contract 1.1, "Exports"): the therapy, the dose history, refills with
their reconciliation and alerts over a period, as the API's own code reads them, and the same
facts for the patient page's therapy and alert sections.

Custody: only the periods in which the patient had the pump in their clinic (``held_periods``);
a pump's earlier holder's readings, refills and alerts are not the patient's report's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from uuid import UUID

from jinja2 import Environment, PackageLoader, select_autoescape

from services.api import models, sql_reports, views
from services.api.auth import Principal
from services.api.problems import FieldError, Problem
from services.api.routes import patients as patient_routes
from services.api.web import dose_chart
from services.domain import rules
from services.domain.alerting import DoseChange, RuleSettings
from services.domain.rules.programming import Tolerance, tolerance
from services.storage import snapshots
from services.storage.database import Connection

DEFAULT_DAYS = 365
MAX_DAYS = 3 * 366
"""The longest period one report covers (three years)."""
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2100, 1, 1, tzinfo=UTC)
LOOKBACK = timedelta(days=31)
MAX_REFILLS = 200
MAX_ALERTS = 300

VERDICT_WORDS = {
    "over_delivery": "Less left than expected: more drug left the reservoir than programmed "
    "(over-infusion, or drug injected beside the port: a pocket fill). Check the patient for "
    "overdose and the pump's program.",
    "under_delivery": "More left than expected: less drug was delivered than programmed "
    "(a catheter occlusion or kink, or the pump stalled). Check the patient for withdrawal and "
    "the catheter.",
}

templates = Environment(
    loader=PackageLoader("services.api.web", "templates"),
    autoescape=select_autoescape(["html"]),
)


def local(at: datetime | None, tz: tzinfo, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    """A time as people at the clinic read it, with the zone named (``CET``, ``CEST``)."""
    return "—" if at is None else at.astimezone(tz).strftime(fmt)


def who(actor: models.Actor | None) -> str:
    if actor is None:
        return "—"
    if actor.type == "service":
        return "pumpwatch (alert engine)"
    return actor.display_name or actor.label or f"{actor.type} {actor.id}"


templates.filters["local"] = local
templates.filters["who"] = who
templates.filters["percent"] = dose_chart.percent


@dataclass(frozen=True, slots=True)
class TherapyChange:
    """The pump's program from ``at`` on, as its readings reported it."""

    at: datetime
    serial: str
    drug: str | None
    concentration_mcg_per_ml: float
    mode: str
    rate_ml_per_day: float
    daily_dose_mcg: float
    dose_change: float | None
    """The change from the dose before (+0.2: 20 % more); None: the first, or the same dose."""
    changed: tuple[str, ...]
    """What changed: ``dose``, ``concentration``, ``mode``, ``drug``, ``pump`` (empty: first)."""


@dataclass(frozen=True, slots=True)
class PumpPeriod:
    serial: str
    since: datetime | None
    until: datetime


@dataclass(frozen=True, slots=True)
class AlertEntry:
    alert: models.AlertOut
    history: list[models.HistoryEntry]


@dataclass
class Report:
    patient: models.Patient
    clinic_name: str
    tz: tzinfo
    since: datetime
    until: datetime
    generated_at: datetime
    settings: RuleSettings
    pumps: list[PumpPeriod] = field(default_factory=list)
    therapy: list[TherapyChange] = field(default_factory=list)
    """The program in force when the period began, then each change within it."""
    refills: list[models.RefillOut] = field(default_factory=list)
    """Newest first."""
    alerts: list[AlertEntry] = field(default_factory=list)
    """Newest first."""
    tolerance: Tolerance | None = None

    @property
    def current(self) -> TherapyChange | None:
        return self.therapy[-1] if self.therapy else None

    @property
    def dose_changes(self) -> list[TherapyChange]:
        return [t for t in self.therapy if t.dose_change is not None and t.at >= self.since]

    @property
    def doses(self) -> list[dose_chart.Dose]:
        levels: list[dose_chart.Dose] = []
        for t in self.therapy:
            if not levels or t.dose_change is not None:
                levels.append(dose_chart.Dose(t.at, t.daily_dose_mcg, t.dose_change))
        return levels

    def chart(self) -> str:
        return dose_chart.render(self.doses, self.since, self.until, self.tz)

    def tolerance_words(self) -> list[str]:
        return tolerance_words(self.tolerance, self.settings, self.tz)

    def verdict(self, refill: models.RefillOut) -> str:
        found = refill.discrepancy
        if found is None:
            return "Nothing said what to expect (a first refill, or no readings before it)."
        if found.classification == "none":
            return "As expected."
        return VERDICT_WORDS[found.classification]


def tolerance_words(found: Tolerance | None, settings: RuleSettings, tz: tzinfo) -> list[str]:
    """The dose-escalation rule's signal, said in words (flagged or not)."""
    window = f"{settings.dose_escalation_window_days:g} days"
    rule = (
        f"pumpwatch flags a possible tolerance (or a catheter problem it may hide) when the "
        f"dose rises {settings.dose_escalation_fraction:.0%} or more above the lowest dose of "
        f"the last {window}, or when the last {settings.dose_escalation_increases} changes "
        "were all increases."
    )
    if found is None:
        return [f"No dose change in the last {window}: nothing to compare.", rule]
    said = [
        f"Now {found.current.daily_dose_mcg:g} mcg/day; the lowest in the last {window} was "
        f"{found.lowest.daily_dose_mcg:g} mcg/day (from {local(found.lowest.at, tz, '%Y-%m-%d')})"
        f": {dose_chart.percent(found.rise)}.",
        _run_words(found.increases_in_a_row, window, settings),
        rule,
    ]
    if found.title:
        said.insert(
            0,
            f"Signal: {found.title}. Needing more drug may be tolerance, but it may also hide a "
            "catheter problem (leak, break, migration, occlusion) or a mass at the catheter "
            "tip: review the symptoms and consider imaging the catheter before raising the "
            "dose again.",
        )
    else:
        said.insert(0, "No tolerance signal: the dose has not escalated by the rule's measure.")
    return said


def _run_words(run: int, window: str, settings: RuleSettings) -> str:
    if run == 0:
        return f"The last change in the last {window} was not an increase."
    return (
        f"Increases in a row in the last {window}: {run} (the rule flags "
        f"{settings.dose_escalation_increases})."
    )


# --- the period ---------------------------------------------------------------------------------


def _when(value: str, name: str, tz: tzinfo) -> datetime:
    """A date (midnight at the clinic) or an RFC 3339 time; naive times are the clinic's."""
    try:
        if len(value) == 10:
            found = datetime.combine(date.fromisoformat(value), datetime.min.time(), tz)
        else:
            found = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
            if found.tzinfo is None:
                found = found.replace(tzinfo=tz)
        at = found.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise _period_problem(name, "a date (YYYY-MM-DD) or an RFC 3339 time") from exc
    if not _EARLIEST <= at <= _LATEST:
        raise _period_problem(name, "between 2000-01-01 and 2100-01-01")
    return at


def _period_problem(name: str, message: str) -> Problem:
    return Problem(
        422,
        f"{name} must be {message}",
        kind="validation",
        errors=[FieldError(field=f"query.{name}", message=f"must be {message}")],
    )


def period(
    since: str | None, until: str | None, tz: tzinfo, now: datetime
) -> tuple[datetime, datetime]:
    """The report's period: ``until`` defaults to now, ``from`` to 12 months before ``until``;
    ``from`` must come before ``until`` and the span be at most ``MAX_DAYS``."""
    end = now if until is None else _when(until, "until", tz)
    start = end - timedelta(days=DEFAULT_DAYS) if since is None else _when(since, "from", tz)
    if start >= end:
        raise _period_problem("from", "before until")
    if end - start > timedelta(days=MAX_DAYS):
        raise _period_problem("until", f"at most {MAX_DAYS} days after from")
    return start, end


async def clinic_zone(db: Connection, clinic_id: UUID) -> tuple[str, tzinfo, RuleSettings]:
    row = await db.fetchrow(sql_reports.CLINIC, clinic_id)
    if row is None:
        return "", UTC, RuleSettings()
    tz = snapshots.zone_of(row["timezone"], None)
    settings = snapshots.clinic_settings(RuleSettings(), row["alert_settings"], clinic_id)
    return row["name"], tz, settings


# --- loading ------------------------------------------------------------------------------------


async def load(
    db: Connection,
    principal: Principal,
    patient_id: UUID,
    since: str | None = None,
    until: str | None = None,
    *,
    history: bool = True,
    therapy_only: bool = False,
) -> Report:
    """The patient's report over the period (403 for the fleet role, 404 for another
    clinic's patient, 422 for a period that is not one); ``therapy_only``: without its refills
    and alerts (the patient page shows its own)."""
    patient = await patient_routes.get_patient(patient_id, principal, db)
    name, tz, settings = await clinic_zone(db, patient.clinic_id)
    now = datetime.now(UTC)
    start, end = period(since, until, tz, now)
    report = Report(patient, name, tz, start, end, now, settings)
    rows = await db.fetch(sql_reports.PATIENT_PUMPS, patient.id, patient.clinic_id, start, end)
    report.pumps = [PumpPeriod(r["serial"], r["since"], r["until"]) for r in rows]
    serials = [p.serial for p in report.pumps]
    # The readings read: the period, and the dose-escalation window before its end, and a month
    # before either (the program in force when they began is the first one read).
    window = timedelta(days=settings.dose_escalation_window_days)
    every = await _therapy(db, patient, serials, min(start, end - window) - LOOKBACK, end)
    doses = [DoseChange(t.at, t.daily_dose_mcg) for t in every if t.dose_change is not None]
    doses = [DoseChange(t.at, t.daily_dose_mcg) for t in every[:1]] + doses
    report.tolerance = tolerance(doses, min(end, now), settings) if doses else None
    # The program in force when the period began, then each change within it.
    report.therapy = [c for c in every if c.at <= start][-1:] + [c for c in every if c.at > start]
    if therapy_only:
        return report
    for serial in serials:
        report.refills += await _refills(db, patient, serial, start, end)
    report.refills.sort(key=lambda r: r.recorded_at, reverse=True)
    report.alerts = await _alerts(
        db, principal, patient=patient, serials=serials, start=start, end=end, history=history
    )
    return report


async def _therapy(
    db: Connection, patient: models.Patient, serials: list[str], begin: datetime, end: datetime
) -> list[TherapyChange]:
    """Every change of the patient's program from ``begin`` to before ``end``, oldest first."""
    rows = [
        (serial, row)
        for serial in serials
        for row in await db.fetch(
            sql_reports.THERAPY_CHANGES, serial, patient.clinic_id, patient.id, end, begin
        )
    ]
    rows.sort(key=lambda item: item[1]["recorded_at"])
    changes: list[TherapyChange] = []
    before: TherapyChange | None = None
    for serial, row in rows:
        dose = float(row["dose"])
        changed: list[str] = []
        change: float | None = None
        if before is not None:
            if before.daily_dose_mcg != dose:
                changed.append("dose")
                if before.daily_dose_mcg > 0:
                    change = dose / before.daily_dose_mcg - 1
            for what, old, new in (
                ("concentration", before.concentration_mcg_per_ml, row["concentration_mcg_per_ml"]),
                ("mode", before.mode, row["infusion_mode"]),
                ("drug", before.drug, row["drug_name"]),
                ("pump", before.serial, serial),
            ):
                if old != new:
                    changed.append(what)
            if not changed:
                continue
        before = TherapyChange(
            row["recorded_at"],
            serial,
            row["drug_name"],
            float(row["concentration_mcg_per_ml"]),
            str(row["infusion_mode"]),
            float(row["rate_ml_per_day"]),
            dose,
            change,
            tuple(changed),
        )
        changes.append(before)
    return changes


async def _refills(
    db: Connection, patient: models.Patient, serial: str, start: datetime, end: datetime
) -> list[models.RefillOut]:
    times = await db.fetch(
        sql_reports.PATIENT_REFILL_TIMES,
        serial,
        patient.clinic_id,
        patient.id,
        start,
        end,
        MAX_REFILLS,
    )
    if not times:
        return []
    wanted = {r["recorded_at"] for r in times}
    upto = times[0]["recorded_at"] + timedelta(microseconds=1)
    found = (await views.snapshots(db, [serial], now=upto, refills=len(times) + 1)).get(serial)
    if found is None:
        return []
    settings = found.settings or RuleSettings()
    return [
        views.refill_out(serial, pair, settings)
        for pair in reversed(rules.reconciliations(found))
        if pair[0].recorded_at in wanted
    ]


async def _alerts(
    db: Connection,
    principal: Principal,
    *,
    patient: models.Patient,
    serials: list[str],
    start: datetime,
    end: datetime,
    history: bool,
) -> list[AlertEntry]:
    if not serials:
        return []
    rows = await db.fetch(
        sql_reports.PATIENT_ALERTS, patient.id, patient.clinic_id, serials, start, end, MAX_ALERTS
    )
    found: dict[UUID, list[models.HistoryEntry]] = {r["id"]: [] for r in rows}
    if history and rows:
        found |= await histories(db, list(found))
    return [AlertEntry(views.alert_out(r, principal), found[r["id"]]) for r in rows]


async def histories(db: Connection, alert_ids: list[UUID]) -> dict[UUID, list[models.HistoryEntry]]:
    """Each alert's history, oldest first (every alert asked for has a list)."""
    found: dict[UUID, list[models.HistoryEntry]] = {a: [] for a in alert_ids}
    for row in await db.fetch(sql_reports.ALERTS_HISTORY, alert_ids):
        entry = dict(row)
        found[entry.pop("alert_id")].append(models.HistoryEntry(**entry))
    return found


# --- HTML ---------------------------------------------------------------------------------------


def html(report: Report, *, links: dict[str, str] | None = None) -> str:
    """The printable page (its own print stylesheet); ``links``: the dashboard's way back and
    its PDF link (none in the API's answer)."""
    return templates.get_template("report.html").render(r=report, links=links or {})
