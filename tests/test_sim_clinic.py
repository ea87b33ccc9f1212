"""The simulator's demo-clinic knobs: claim codes, titration, a refill brought into the history."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from lab.sim.fleet import Fault, Fleet
from services.domain import contract

NOW = datetime(2026, 12, 7, 12, 5, tzinfo=UTC)
START = NOW - timedelta(days=60)


def _serials() -> list[str]:
    return [p.serial for p in Fleet(pumps=8, seed=11, start=START).pumps]


def test_claim_codes_are_valid_events_of_a_source_of_their_own_and_change_nothing_else() -> None:
    serials = _serials()
    claims_from = NOW - timedelta(minutes=30)
    fleet = Fleet(pumps=8, seed=11, start=START, claimable=[serials[7]], claims_from=claims_from)
    messages = fleet.advance(NOW)
    claims = [m for m in messages if json.loads(m.payload).get("type") == "claim"]
    # Every 20 minutes on the hour's grid, from claims_from on: 11:40 and 12:00.
    assert [m.at for m in claims] == [
        datetime(2026, 12, 7, 11, 40, tzinfo=UTC),
        datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
    ]
    codes = set()
    for m in claims:
        event = contract.decode("events", m.payload)
        contract.check(
            event,
            topic_serial=serials[7],
            now=NOW,
            max_future=timedelta(minutes=5),
            oldest=START - timedelta(days=1),
        )
        assert isinstance(event, contract.ClaimEvent)
        assert event.claim.expires_at - event.recorded_at == contract.CLAIM_LIFETIME
        assert event.source_id != fleet.pump(serials[7]).programmer_id
        codes.add(event.claim.code)
    assert len(codes) == 2
    # The fleet's other messages are the same as without claims (a resumed fleet replays them).
    plain = Fleet(pumps=8, seed=11, start=START).advance(NOW)
    assert [m.payload for m in messages if m not in claims] == [m.payload for m in plain]
    # The same moment gives the same code, however the fleet was started.
    later = Fleet(pumps=8, seed=11, start=START, claimable=[serials[7]], claims_from=NOW)
    again = [m for m in later.advance(NOW + timedelta(hours=1)) if m.at == claims[-1].at]
    assert again == []  # none before claims_from
    resumed = Fleet(pumps=8, seed=11, start=START, claimable=[serials[7]], claims_from=START)
    same = [m for m in resumed.advance(NOW) if m.at == claims[-1].at and m.serial == serials[7]]
    assert json.loads(same[-1].payload)["claim"] == json.loads(claims[-1].payload)["claim"]


def test_a_titrating_pump_has_its_dose_raised_every_few_weeks() -> None:
    serials = _serials()
    fleet = Fleet(pumps=8, seed=11, start=START, titrating=[serials[1]])
    changes = [
        json.loads(m.payload)
        for m in fleet.advance(NOW)
        if m.serial == serials[1] and b'"prescription_change"' in m.payload
    ]
    assert len(changes) >= 2
    first = fleet.pump(serials[1]).daily_dose_mcg
    assert changes[-1]["infusion"]["daily_dose_mcg"] > first


def test_a_first_refill_brought_into_the_history_shows_an_over_infusing_pumps_discrepancy() -> None:
    serials = _serials()
    fleet = Fleet(
        pumps=8,
        seed=11,
        start=START,
        faults={serials[0]: [Fault.OVER_INFUSION]},
        first_refill={serials[0]: timedelta(days=40)},
    )
    refills = [
        json.loads(m.payload)
        for m in fleet.advance(NOW)
        if m.serial == serials[0] and b'"type":"refill"' in m.payload
    ]
    assert refills
    first = refills[0]["refill"]
    assert first["expected_residual_ml"] - first["residual_ml"] > 2.0
