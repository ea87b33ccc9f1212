"""Evaluating a batch of pumps: lock, load, judge, plan, apply — one transaction.

Every change an evaluation makes (alert opened, reopened, escalated, eased, resolved) is written
with its history row and an outbox row in the same transaction, so a notification can never
announce what did not happen, nor miss what did. The pump's forecast (the read model the
worklist reads, services/storage/forecasts.py) is written in the same transaction, after them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from services.alerts import sql
from services.alerts.lifecycle import Change, Refresh, StoredAlert, plan
from services.alerts.metrics import AlertsMetrics
from services.domain import conditions, rules
from services.domain.alerting import Priority, Rule, RuleSettings, Snapshot
from services.logs import get
from services.storage import forecasts, outbox
from services.storage.database import Connection
from services.storage.snapshots import PumpContext, load

log = get(__name__)

_OUTBOX_EVENT = {
    "opened": "alert.opened",
    "reopened": "alert.opened",
    "escalated": "alert.escalated",
    "eased": "alert.eased",
    "resolved": "alert.resolved",
}
_RECENT_DATA_S = 60.0
"""Changes caused by data this fresh count for the commit-to-alert latency metric."""


@dataclass(slots=True)
class BatchResult:
    evaluated: int = 0
    failed: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        settings: RuleSettings,
        flap_window: timedelta,
        data_clock: bool,
        metrics: AlertsMetrics,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.flap_window = flap_window
        self.data_clock = data_clock
        self.metrics = metrics

    async def evaluate(self, serials: list[str]) -> BatchResult:
        """Evaluate these pumps now; raises on database failure (the caller retries)."""
        result = BatchResult()
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(sql.LOCK_PUMPS, serials)
            wall_now = datetime.now(UTC)
            now = await self._now(conn, wall_now)
            seen = await forecasts.versions(conn, serials)
            loaded = await load(conn, serials, now=now, wall_now=wall_now, settings=self.settings)
            stored = await self._stored(conn, serials)
            refreshes: list[tuple[Refresh, datetime]] = []
            found: list[forecasts.Forecast] = []
            for serial, (snapshot, context) in sorted(loaded.items()):
                try:
                    changes, refresh = self._judge(snapshot, stored.get(serial, []))
                except Exception:  # a rule's bug must not stop the other pumps
                    log.exception("evaluation_failed", serial=serial)
                    self.metrics.errors.inc()
                    result.failed.append(serial)
                    continue
                result.evaluated += 1
                try:  # nor may the read model's keep its alerts from being recorded
                    found.append(forecasts.of(snapshot))
                except Exception:
                    log.exception("forecast_failed", serial=serial)
                    self.metrics.errors.inc()
                refreshes.extend((r, now) for r in refresh)
                for change in changes:
                    await self._apply(conn, change, context, now=now, wall_now=wall_now)
                    result.changes.append(change)
                    self._observe(change, context, wall_now)
            await self._refresh(conn, refreshes)
            await self._record_doses(conn, [c for _, c in loaded.values()])
            # The read model, after the alert changes (its alert summary counts them).
            await forecasts.write(conn, found, seen, wall_now=wall_now)
        self.metrics.evaluations.inc(result.evaluated)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return result

    async def _now(self, conn: Connection, wall_now: datetime) -> datetime:
        if not self.data_clock:
            return wall_now
        newest: datetime | None = await conn.fetchval(sql.DATA_CLOCK)
        return newest if newest is not None else wall_now

    async def _stored(self, conn: Connection, serials: list[str]) -> dict[str, list[StoredAlert]]:
        stored: dict[str, list[StoredAlert]] = {}
        for row in await conn.fetch(sql.ALERTS, serials):
            try:
                rule = Rule(row["rule"])
            except ValueError:
                continue  # a rule this version no longer knows: left as it is
            stored.setdefault(row["serial"], []).append(
                StoredAlert(
                    str(row["id"]),
                    rule,
                    Priority.from_label(row["priority"]),
                    row["status"],
                    row["title"],
                    row["detail"],
                    # The flapping window is measured on the engine's clock.
                    row["condition_at"]
                    if self.data_clock and row["resolved_at"] is not None
                    else row["resolved_at"],
                    row["occurrence"],
                )
            )
        return stored

    def _judge(
        self, snapshot: Snapshot, stored: list[StoredAlert]
    ) -> tuple[list[Change], list[Refresh]]:
        findings = conditions.fold(rules.evaluate(snapshot))
        return plan(
            findings,
            stored,
            now=snapshot.now,
            flap_window=self.flap_window,
            resolution=lambda rule: rules.resolution(rule, snapshot),
        )

    async def _apply(
        self,
        conn: Connection,
        change: Change,
        context: PumpContext,
        *,
        now: datetime,
        wall_now: datetime,
    ) -> None:
        finding = change.finding
        if change.action == "opened":
            assert finding is not None
            row = await conn.fetchrow(
                sql.INSERT_ALERT,
                context.serial,
                change.rule.value,
                change.to_priority.label,
                finding.title,
                finding.detail,
                finding.facts,
                wall_now,
                now,
                finding.occurrence,
                conditions.condition_of(change.rule),
            )
        elif change.action == "reopened":
            assert finding is not None
            row = await conn.fetchrow(
                sql.REOPEN_ALERT,
                change.alert_id,
                change.to_priority.label,
                finding.title,
                finding.detail,
                finding.facts,
                wall_now,
                now,
                finding.occurrence,
                change.rule.value,
            )
        elif change.action in ("escalated", "eased"):
            assert finding is not None
            row = await conn.fetchrow(
                sql.REPRIORITISE_ALERT,
                change.alert_id,
                change.to_priority.label,
                change.to_status,
                finding.title,
                finding.detail,
                finding.facts,
                wall_now,
                now,
                finding.occurrence,
                change.rule.value,
                change.action == "escalated",
            )
        else:
            row = await conn.fetchrow(
                sql.RESOLVE_ALERT, change.alert_id, wall_now, change.reason, now
            )
        if row is None:  # another engine got there first: nothing to record
            return
        await conn.execute(
            sql.INSERT_HISTORY,
            row["id"],
            wall_now,
            change.action,
            change.from_status,
            change.to_status,
            None if change.from_priority is None else change.from_priority.label,
            change.to_priority.label,
            change.reason,
            finding.facts if finding else {},
        )
        await outbox.add(
            conn,
            _OUTBOX_EVENT[change.action],
            outbox.alert_object(row),
            alert_id=row["id"],
            clinic_id=row["clinic_id"],
        )

    async def _refresh(self, conn: Connection, refreshes: list[tuple[Refresh, datetime]]) -> None:
        if not refreshes:
            return
        await conn.execute(
            sql.REFRESH_ALERTS,
            [r.alert_id for r, _ in refreshes],
            [r.finding.title for r, _ in refreshes],
            [r.finding.detail for r, _ in refreshes],
            [r.finding.facts for r, _ in refreshes],
            [at for _, at in refreshes],
            [r.finding.occurrence for r, _ in refreshes],
        )

    async def _record_doses(self, conn: Connection, contexts: list[PumpContext]) -> None:
        new = [(c.serial, c.new_dose) for c in contexts if c.new_dose is not None]
        if new:
            await conn.execute(
                sql.INSERT_DOSES,
                [serial for serial, _ in new],
                [dose.at for _, dose in new],
                [dose.daily_dose_mcg for _, dose in new],
                ["reading"] * len(new),
            )

    def _observe(self, change: Change, context: PumpContext, wall_now: datetime) -> None:
        self.metrics.changes.labels(
            action=change.action, rule=change.rule.value, priority=change.to_priority.label
        ).inc()
        updated = context.state_updated_at
        if change.action in ("opened", "reopened", "escalated") and updated is not None:
            latency = (wall_now - updated).total_seconds()
            if 0 <= latency <= _RECENT_DATA_S:
                self.metrics.latency_seconds.observe(latency)
