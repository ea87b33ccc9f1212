"""The fleet simulator: determinism, the wire contract, the physics of each fault, publishing.

Pure tests except the two that publish to a real broker of their own (the ``broker`` fixture).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lab.embedded import EmbeddedBroker
from lab.sim.command import OptionError, parse_fault, parse_fault_rate
from lab.sim.fleet import Fault, Fleet, Outgoing, PumpProfile
from lab.sim.publisher import PublishReport, publish_all, run_live, sim_clock
from lab.sim.pump import uuid4_text
from lab.sim.resend import DeviceBuffers, TransitLoss
from services.domain.contract import (
    Message,
    Reason,
    Rejected,
    check,
    decode,
    parse_topic,
)
from services.settings import parse_mqtt_url

START = datetime(2026, 3, 1, tzinfo=UTC)
OLDEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(minutes=5)


def judge(message: Outgoing, *, prefix: str = "") -> Message:
    """Decode and check a message as ingest would, at the moment it was sent."""
    serial, kind = parse_topic(message.topic, prefix)
    assert kind == message.kind
    decoded = decode(kind, message.payload)
    check(decoded, topic_serial=serial, now=message.at, max_future=MAX_FUTURE, oldest=OLDEST)
    return decoded


def docs(
    messages: Iterable[Outgoing], serial: str, kind: str = "telemetry"
) -> list[dict[str, Any]]:
    """The parsed payloads of one pump's valid messages of one kind, in order."""
    return [
        json.loads(m.payload) for m in messages if m.serial == serial and m.kind == kind and m.valid
    ]


def events(messages: Iterable[Outgoing], serial: str, type_: str) -> list[dict[str, Any]]:
    return [d for d in docs(messages, serial, "events") if d["type"] == type_]


def stamp(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(doc["recorded_at"])


def volume(doc: dict[str, Any]) -> float:
    value: float = doc["reservoir"]["volume_ml"]
    return value


# -- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_payloads_and_another_seed_does_not() -> None:
    rates = {Fault.MALFORMED: 0.2, Fault.GAP: 0.2, Fault.OVER_INFUSION: 0.1}

    def run(seed: int) -> list[tuple[str, bytes, str | None, bool]]:
        fleet = Fleet(pumps=20, seed=seed, start=START, fault_rates=rates)
        return [(m.topic, m.payload, m.msg_id, m.valid) for m in fleet.take(4000)]

    first, again, other = run(5), run(5), run(6)
    assert first == again
    ids = [msg_id for _, _, msg_id, _ in first if msg_id]
    assert len(set(ids)) == len(ids) > 3000
    assert not {payload for _, payload, _, _ in first} & {payload for _, payload, _, _ in other}
    assert {t for t, *_ in first} != {t for t, *_ in other}


def test_how_the_run_is_cut_does_not_change_the_stream() -> None:
    def fleet() -> Fleet:
        return Fleet(pumps=15, seed=9, start=START, fault_rates={Fault.GAP: 0.3})

    whole = fleet().advance(START + timedelta(days=3))
    pieces = fleet()
    cut: list[Outgoing] = []
    for hours in (1, 7, 7.5, 30, 31, 72):
        cut += pieces.advance(START + timedelta(hours=hours))
    taken = fleet()
    chunks = taken.take(1) + taken.take(999) + taken.take(len(whole) - 1000)
    assert [m.payload for m in cut] == [m.payload for m in whole]
    assert [m.payload for m in chunks] == [m.payload for m in whole]
    assert len(whole) > 4000


def test_uuid_text_is_uuid4_of_the_same_bits() -> None:
    rng = random.Random(1)
    for bits in [0, 2**128 - 1, *(rng.getrandbits(128) for _ in range(1000))]:
        assert uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))


# -- the contract --------------------------------------------------------------------------------


def test_valid_messages_pass_the_contract_and_malformed_ones_are_refused_for_their_reason() -> None:
    fleet = Fleet(
        pumps=30,
        seed=3,
        start=START,
        fault_rates={Fault.MALFORMED: 1.0, Fault.BATTERY: 0.2, Fault.MOTOR_STALL: 0.2},
    )
    messages = fleet.take(6000) + fleet.advance(START + timedelta(days=40))
    refused: Counter[Reason] = Counter()
    for message in messages:
        if message.valid:
            decoded = judge(message)
            assert decoded.msg_id == message.msg_id
            assert decoded.serial == message.serial
            assert message.reason is None
        else:
            with pytest.raises(Rejected) as caught:
                judge(message)
            assert caught.value.reason == message.reason, message.payload
            refused[caught.value.reason] += 1
            if message.msg_id is not None:
                assert message.msg_id.encode() in message.payload
    assert set(refused) == {
        Reason.INVALID_JSON,
        Reason.SCHEMA,
        Reason.SERIAL_MISMATCH,
        Reason.CLOCK_SKEW,
        Reason.INCONSISTENT_DOSE,
    }
    share = sum(refused.values()) / len(messages)
    assert 0.05 < share < 0.15
    kinds = Counter(m.kind for m in messages if not m.valid)
    assert kinds["events"] > 0


def test_malformed_payloads_are_varied() -> None:
    fleet = Fleet(pumps=10, seed=4, start=START, fault_rates={Fault.MALFORMED: 1.0})
    broken = [m.payload for m in fleet.take(5000) if not m.valid]
    signs = {
        "truncated": any(not p.endswith((b"}", b"]")) for p in broken),
        "NaN": any(b"NaN" in p for p in broken),
        "duplicate key": any(p.count(b'"serial":') == 2 for p in broken),
        "NUL": any(b"\\u0000" in p for p in broken),
        "negative volume": any(b'"volume_ml":-' in p for p in broken),
        "missing field": any(b'"msg_id"' not in p and p.endswith(b"}") for p in broken),
    }
    assert all(signs.values()), signs


def test_daily_dose_agrees_with_rate_and_flex_rate_is_the_schedule_average() -> None:
    fleet = Fleet(pumps=60, seed=11, start=START, interval=timedelta(hours=2))
    messages = fleet.advance(START + timedelta(days=90))
    infusions = [
        (d["infusion"], d["drug"]["concentration_mcg_per_ml"])
        for m in messages
        if m.kind == "telemetry"
        for d in [json.loads(m.payload)]
    ]
    modes = Counter(infusion["mode"] for infusion, _ in infusions)
    assert modes["flex"] > 0
    assert modes["continuous"] > modes["flex"]
    for infusion, concentration in infusions:
        rate = infusion["rate_ml_per_day"]
        assert abs(infusion["daily_dose_mcg"] - rate * concentration) <= 0.01 * rate * concentration
        if infusion["mode"] == "flex":
            steps = infusion["schedule"]
            assert 2 <= len(steps) <= 4
            assert abs(rate - _time_weighted_average(steps)) <= 1e-6
    changes = [e for p in fleet.pumps for e in events(messages, p.serial, "prescription_change")]
    assert changes
    for change in changes:
        infusion = change["infusion"]
        if infusion["mode"] == "flex":
            assert infusion["rate_ml_per_day"] == pytest.approx(
                _time_weighted_average(infusion["schedule"]), rel=1e-5, abs=1e-6
            )


def _time_weighted_average(steps: list[dict[str, Any]]) -> float:
    minutes = [int(s["start"][:2]) * 60 + int(s["start"][3:]) for s in steps]
    total = 0.0
    for i, step in enumerate(steps):
        length = (minutes[(i + 1) % len(steps)] - minutes[i]) % 1440 or 1440
        total += step["rate_ml_per_day"] * length
    return total / 1440


def _scheduled_ml(steps: list[dict[str, Any]], a: datetime, b: datetime) -> float:
    """Volume a flex schedule delivers between two local times, minute by minute."""
    minutes = [int(s["start"][:2]) * 60 + int(s["start"][3:]) for s in steps]

    def rate_at(minute_of_day: int) -> float:
        active = [i for i, start in enumerate(minutes) if start <= minute_of_day]
        rate: float = steps[active[-1] if active else -1]["rate_ml_per_day"]
        return rate

    total = 0.0
    moment = a
    while moment < b:
        total += rate_at(moment.hour * 60 + moment.minute) / 1440
        moment += timedelta(minutes=1)
    return total


def test_flex_delivery_follows_the_schedule_step_by_step() -> None:
    fleet = Fleet(pumps=80, seed=2, start=START, interval=timedelta(hours=4))
    flex = [p for p in fleet.pumps if p.mode == "flex" and p.basis == "calculated"]
    pump = max(flex, key=_spread)
    assert _spread(pump) > 0.3
    messages = fleet.advance(START + timedelta(days=20))
    readings = docs(messages, pump.serial)
    visits = [stamp(d) for d in docs(messages, pump.serial, "events")]
    checked = flat_misses = 0
    for before, after in itertools.pairwise(readings):
        a, b = stamp(before), stamp(after)
        if any(a < visit <= b for visit in visits):
            continue
        steps = before["infusion"]["schedule"]
        delivered = volume(before) - volume(after)
        assert delivered == pytest.approx(_scheduled_ml(steps, a, b), abs=0.011)
        flat = before["infusion"]["rate_ml_per_day"] * (b - a) / timedelta(days=1)
        flat_misses += abs(delivered - flat) > 0.02
        checked += 1
    assert checked > 80
    assert flat_misses > 10  # the average rate alone would not explain the readings


def _spread(pump: PumpProfile) -> float:
    rates = [s.rate_ml_per_day for s in pump.schedule]
    return max(rates) - min(rates)


# -- sequence numbers ----------------------------------------------------------------------------


def test_seq_rises_by_one_per_source_except_where_the_gap_fault_lost_messages() -> None:
    fleet = Fleet(pumps=25, seed=8, start=START, fault_rates={Fault.GAP: 0.4})
    messages = fleet.advance(START + timedelta(days=60))
    sent: dict[tuple[str, str], list[int]] = defaultdict(list)
    for message in messages:
        doc = json.loads(message.payload)
        sent[doc["serial"], doc["source"]["id"]].append(doc["seq"])
    lost: dict[tuple[str, str], list[int]] = defaultdict(list)
    for item in fleet.lost:
        lost[item.serial, item.source_id].append(item.seq)
    gappy = {p.serial for p in fleet.with_fault(Fault.GAP)}
    assert len(gappy) == 10
    kinds = {json.loads(m.payload)["source"]["kind"] for m in messages}
    assert kinds == {"home_hub", "clinician_programmer"}
    for key, seqs in sent.items():
        serial = key[0]
        assert seqs == sorted(seqs)
        assert sorted(seqs + lost[key]) == list(range(len(seqs) + len(lost[key])))
        steps = {b - a for a, b in itertools.pairwise(seqs)}
        if serial in gappy:
            continue
        assert seqs[0] == 0
        assert steps <= {1}
        assert not lost[key]
    jumps = [
        b - a
        for (serial, _), seqs in sent.items()
        if serial in gappy
        for a, b in itertools.pairwise(seqs)
        if b - a > 1
    ]
    assert len(jumps) > 20


# -- the physics of each fault -------------------------------------------------------------------


def test_refills_reveal_over_infusion_and_a_healthy_pump_matches_its_expectation() -> None:
    fleet = Fleet(
        pumps=30,
        seed=12,
        start=START,
        interval=timedelta(hours=6),
        fault_rates={Fault.OVER_INFUSION: 0.3},
    )
    messages = fleet.advance(START + timedelta(days=240))
    over = fleet.with_fault(Fault.OVER_INFUSION)
    assert len(over) == 9
    for pump in fleet.pumps:
        refills = [e["refill"] for e in events(messages, pump.serial, "refill")]
        assert refills, pump.serial
        filled = float(pump.capacity_ml)
        for refill in refills:
            shortfall = refill["expected_residual_ml"] - refill["residual_ml"]
            should_have_gone = filled - refill["expected_residual_ml"]
            if pump in over:
                # Less left than the pump believed, by more than the labelled accuracy.
                assert shortfall > 0
                assert shortfall > 2.0 or shortfall > 0.145 * should_have_gone
            else:
                assert abs(shortfall) < 0.15 + 0.015 * should_have_gone
            filled = refill["added_ml"]


def test_a_calculated_pump_that_over_infuses_reports_the_programmed_volume() -> None:
    probe = Fleet(pumps=30, seed=12, start=START)
    pump = next(p for p in probe.pumps if p.basis == "calculated" and p.mode == "continuous")
    fleet = Fleet(
        pumps=30,
        seed=12,
        start=START,
        interval=timedelta(hours=6),
        faults={pump.serial: {Fault.OVER_INFUSION}},
    )
    messages = fleet.advance(START + timedelta(days=10))
    readings = docs(messages, pump.serial)
    visits = [stamp(d) for d in docs(messages, pump.serial, "events")]
    pairs = 0
    for before, after in itertools.pairwise(readings):
        if any(stamp(before) < v <= stamp(after) for v in visits):
            continue
        days = (stamp(after) - stamp(before)) / timedelta(days=1)
        programmed = before["infusion"]["rate_ml_per_day"] * days
        assert volume(before) - volume(after) == pytest.approx(programmed, abs=0.011)
        pairs += 1
    assert pairs > 20


def test_motor_stall_raises_its_alarm_on_and_off_and_leaves_more_residual_than_expected() -> None:
    fleet = Fleet(
        pumps=20,
        seed=13,
        start=START,
        interval=timedelta(hours=1),
        fault_rates={Fault.MOTOR_STALL: 0.25},
    )
    messages = fleet.advance(START + timedelta(days=200))
    stalled = fleet.with_fault(Fault.MOTOR_STALL)
    assert len(stalled) == 5
    assert all(p.model.startswith("SynchroMed") for p in stalled)
    revealing = 0
    for pump in fleet.pumps:
        readings = docs(messages, pump.serial)
        alarms = [set(d["alarms"]) for d in readings]
        if pump not in stalled:
            assert not any({"motor_stall", "motor_stall_recovered"} & a for a in alarms)
            continue
        on = [("motor_stall" in a) for a in alarms]
        assert 0.05 < sum(on) / len(on) < 0.6  # intermittent
        assert any("motor_stall_recovered" in a for a in alarms)
        since = START
        for event in events(messages, pump.serial, "refill"):
            refill, at = event["refill"], stamp(event)
            stalled_days = sum(
                1 / 24 for d in readings if since <= stamp(d) < at and "motor_stall" in d["alarms"]
            )
            rate = next(d for d in reversed(readings) if stamp(d) < at)["infusion"][
                "rate_ml_per_day"
            ]
            withheld = stalled_days * rate
            surplus = refill["residual_ml"] - refill["expected_residual_ml"]
            assert surplus > 0.7 * withheld - 0.15
            if withheld > 0.5:
                revealing += 1
                assert surplus > 0.3
            since = at
    assert revealing >= 3


def test_occlusion_flattens_measured_volume_and_flow_while_the_programme_runs() -> None:
    fleet = Fleet(
        pumps=30,
        seed=14,
        start=START,
        interval=timedelta(hours=1),
        fault_rates={Fault.OCCLUSION: 0.1},
    )
    messages = fleet.advance(START + timedelta(days=60))
    blocked = fleet.with_fault(Fault.OCCLUSION)
    assert blocked
    assert all(p.has_flow_sensor and p.basis == "measured" for p in blocked)
    for pump in blocked:
        readings = docs(messages, pump.serial)
        low = [
            d["flow"]["measured_ml_per_day"] < 0.05 * d["infusion"]["rate_ml_per_day"]
            for d in readings[1:]
        ]
        longest = run = 0
        for flag in low:
            run = run + 1 if flag else 0
            longest = max(longest, run)
        assert longest >= 24  # at least a day with (almost) no flow
        assert 0.1 < sum(low) / len(low) < 0.9  # and it comes and goes
        flat_days = [b for a, b in itertools.pairwise(readings) if volume(a) == volume(b)]
        assert len(flat_days) >= 24
        assert any(
            r["residual_ml"] > r["expected_residual_ml"] + 0.3
            for r in (e["refill"] for e in events(messages, pump.serial, "refill"))
        )
    healthy = [p for p in fleet.healthy() if p.has_flow_sensor]
    assert healthy
    for pump in healthy:
        for d in docs(messages, pump.serial)[1:]:
            if not d["alarms"]:
                flow = d["flow"]["measured_ml_per_day"]
                # Boluses add to the flow of one reading; otherwise it tracks the programme.
                assert flow > 0.8 * d["infusion"]["rate_ml_per_day"]


def test_missed_refill_runs_to_the_low_alarm_and_then_empty() -> None:
    probe = Fleet(pumps=10, seed=15, start=START)
    serials = [p.serial for p in probe.pumps[:2]]
    fleet = Fleet(
        pumps=10,
        seed=15,
        start=START,
        interval=timedelta(hours=6),
        faults={s: {Fault.MISSED_REFILL} for s in serials},
    )
    messages = fleet.advance(START + timedelta(days=200))
    for serial in serials:
        assert not events(messages, serial, "refill")
        readings = docs(messages, serial)
        volumes = [volume(d) for d in readings]
        assert volumes == sorted(volumes, reverse=True)
        alarms = [d["alarms"] for d in readings]
        first_low = next(i for i, a in enumerate(alarms) if "low_reservoir" in a)
        first_empty = next(i for i, a in enumerate(alarms) if "empty_reservoir" in a)
        assert 0 < first_low < first_empty
        assert volumes[first_low] <= fleet.pump(serial).low_alarm_ml
        assert all(v == 0.0 for v in volumes[first_empty:])
        assert all("empty_reservoir" in a for a in alarms[first_empty:])
        assert not any("empty_reservoir" in a for a in alarms[:first_empty])
    for pump in fleet.pumps:
        if pump.serial not in serials:
            assert not any(
                {"low_reservoir", "empty_reservoir"} & set(d["alarms"])
                for d in docs(messages, pump.serial)
            )


def test_battery_goes_from_ok_to_eri_to_eos_and_delivery_stops() -> None:
    fleet = Fleet(
        pumps=12,
        seed=16,
        start=START,
        interval=timedelta(hours=6),
        fault_rates={Fault.BATTERY: 0.25},
    )
    messages = fleet.advance(START + timedelta(days=60))
    failing = fleet.with_fault(Fault.BATTERY)
    assert len(failing) == 3
    for pump in fleet.pumps:
        readings = docs(messages, pump.serial)
        statuses = [d["battery"]["status"] for d in readings]
        if pump not in failing:
            assert set(statuses) == {"ok"}
            continue
        order = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
        assert order == ["ok", "eri", "eos"]
        percents = [d["battery"]["remaining_pct"] for d in readings]
        assert percents == sorted(percents, reverse=True)
        for doc, status in zip(readings, statuses, strict=True):
            assert ("eri" in doc["alarms"]) == (status == "eri")
            assert ("eos" in doc["alarms"]) == (status == "eos")
        dead = [volume(d) for d, s in zip(readings, statuses, strict=True) if s == "eos"]
        assert len(dead) > 4
        assert all(b >= a for a, b in itertools.pairwise(dead))  # nothing delivered


def test_a_silent_pump_stops_publishing_while_the_others_carry_on() -> None:
    probe = Fleet(pumps=8, seed=17, start=START)
    quiet = probe.pumps[3].serial
    fleet = Fleet(
        pumps=8,
        seed=17,
        start=START,
        interval=timedelta(hours=1),
        faults={quiet: {Fault.SILENCE}},
    )
    until = START + timedelta(days=30)
    messages = fleet.advance(until)
    last: dict[str, datetime] = {}
    for message in messages:
        last[message.serial] = message.at
    assert START + timedelta(hours=12) < last[quiet] <= START + timedelta(days=10, hours=1)
    for pump in fleet.pumps:
        if pump.serial != quiet:
            assert last[pump.serial] > until - timedelta(hours=1)


# -- time and counts -----------------------------------------------------------------------------


def test_nothing_is_recorded_after_the_time_advanced_to() -> None:
    fleet = Fleet(pumps=40, seed=18, start=START, fault_rates={Fault.GAP: 0.2})
    previous = START - timedelta(microseconds=1)
    total = 0
    for minutes in (0, 1, 7, 15, 15, 16, 200, 1000, 1441, 5000, 5000.5):
        until = START + timedelta(minutes=minutes)
        batch = fleet.advance(until)
        total += len(batch)
        for message in batch:
            recorded = datetime.fromisoformat(json.loads(message.payload)["recorded_at"])
            assert previous < recorded <= until
            assert recorded == message.at
        assert [m.at for m in batch] == sorted(m.at for m in batch)
        previous = max(previous, until)
    assert total > 3 * 40 * 24


def test_take_returns_exactly_the_count_asked_for() -> None:
    fleet = Fleet(pumps=7, seed=19, start=START, fault_rates={Fault.GAP: 0.5})
    assert fleet.take(0) == []
    assert len(fleet.take(1)) == 1
    assert len(fleet.take(12345)) == 12345
    quiet = Fleet(pumps=3, seed=19, start=START, fault_rates={Fault.SILENCE: 1.0})
    with pytest.raises(RuntimeError, match="silent"):
        quiet.take(10**6)


def test_sim_clock_runs_fast_but_never_ahead_of_the_wall_clock() -> None:
    wall = datetime(2026, 6, 1, tzinfo=UTC)
    origin = wall - timedelta(days=30)
    assert sim_clock(wall_now=wall, origin=origin, elapsed_s=60, accelerate=1440) == (
        origin + timedelta(days=1)
    )
    assert sim_clock(wall_now=wall, origin=origin, elapsed_s=3600, accelerate=1440) == wall


# -- the fleet's make-up -------------------------------------------------------------------------


def test_pumps_look_like_a_real_baclofen_fleet() -> None:
    fleet = Fleet(pumps=400, seed=20, start=START)
    pumps = fleet.pumps
    assert len({p.serial for p in pumps}) == 400
    assert all(re.fullmatch(r"NGP[0-9]{6}[A-Z]", p.serial) for p in pumps)
    assert {p.model for p in pumps} == {
        "SynchroMed II 8637-20",
        "SynchroMed II 8637-40",
        "Prometra II",
    }
    for pump in pumps:
        synchromed = pump.model.startswith("SynchroMed")
        assert pump.capacity_ml in (20, 40)
        assert pump.low_alarm_ml == (2.0 if synchromed else 3.0)
        assert pump.has_flow_sensor == (pump.basis == "measured")
        assert not (synchromed and pump.has_flow_sensor)
        assert pump.concentration_mcg_per_ml in (500, 1000, 2000)
        assert pump.drug == "baclofen"
    sensors = sum(p.has_flow_sensor for p in pumps)
    prometra = sum(p.model == "Prometra II" for p in pumps)
    assert 0.2 * prometra < sensors < 0.8 * prometra
    usual = sum(290 <= p.daily_dose_mcg <= 810 for p in pumps)
    assert usual > 0.75 * len(pumps)
    cycles = sorted(p.days_to_low_alarm_when_full for p in pumps)
    assert sum(30 <= c <= 190 for c in cycles) > 0.9 * len(cycles)


def test_fault_rates_pick_that_share_of_suitable_pumps_and_faults_do_not_change_profiles() -> None:
    plain = Fleet(pumps=100, seed=21, start=START)
    faulty = Fleet(
        pumps=100,
        seed=21,
        start=START,
        fault_rates={Fault.GAP: 0.1, Fault.MOTOR_STALL: 0.2, Fault.OCCLUSION: 0.05},
    )
    assert [p.serial for p in plain.pumps] == [p.serial for p in faulty.pumps]
    assert [p.rate_ml_per_day for p in plain.pumps] == [p.rate_ml_per_day for p in faulty.pumps]
    assert faulty.fault_counts() == {Fault.MOTOR_STALL: 20, Fault.OCCLUSION: 5, Fault.GAP: 10}
    assert all(p.model.startswith("SynchroMed") for p in faulty.with_fault(Fault.MOTOR_STALL))
    assert all(p.has_flow_sensor for p in faulty.with_fault(Fault.OCCLUSION))
    prometra = next(p for p in plain.pumps if not p.model.startswith("SynchroMed"))
    with pytest.raises(ValueError, match="motor_stall needs a SynchroMed"):
        Fleet(pumps=100, seed=21, start=START, faults={prometra.serial: {Fault.MOTOR_STALL}})
    with pytest.raises(ValueError, match="no pump"):
        Fleet(pumps=100, seed=21, start=START, faults={"NGP000000A": {Fault.GAP}})


def test_command_options_parse_and_refuse_clearly() -> None:
    assert parse_fault("NGP204519H:motor_stall") == ("NGP204519H", Fault.MOTOR_STALL)
    assert parse_fault_rate("gap=0.25") == (Fault.GAP, 0.25)
    for bad in ("NGP204519H", "NGP204519H:melted"):
        with pytest.raises(OptionError, match="--fault"):
            parse_fault(bad)
    for bad in ("gap", "gap=lots", "gap=1.5", "sparks=0.1"):
        with pytest.raises(OptionError, match="--fault-rate"):
            parse_fault_rate(bad)


# -- a real broker -------------------------------------------------------------------------------


class _Subscriber:
    """A separate MQTT client that records what arrives on ``<prefix>/pumps/+/+``."""

    def __init__(self, prefix: str, broker: EmbeddedBroker) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.arrived_at: list[datetime] = []
        self._subscribed = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"simtest-sub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5 if broker.supports_mqtt5 else paho.MQTTv311,
        )
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self._subscribed.set()
        properties = None
        if broker.supports_mqtt5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # Let the broker send as much as it likes: a slow subscriber must not lose messages.
            properties.ReceiveMaximum = 65535
        url = parse_mqtt_url(broker.url)
        client.connect(url.host, url.port, properties=properties)
        client.loop_start()
        client.subscribe(f"{prefix}/pumps/+/+", qos=1)
        assert self._subscribed.wait(10), "no SUBACK from the broker"
        self.client = client

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))
        self.arrived_at.append(datetime.now(UTC))

    def wait_for(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # anything beyond the count (duplicates) would show up by now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_publish_all_delivers_every_message_to_a_real_broker(broker: EmbeddedBroker) -> None:
    prefix = f"simtest-{uuid.uuid4().hex[:8]}"
    fleet = Fleet(
        pumps=20,
        seed=22,
        start=datetime.now(UTC) - timedelta(days=10),
        fault_rates={Fault.MALFORMED: 0.2},
        topic_prefix=prefix,
    )
    messages = fleet.take(5000)
    subscriber = _Subscriber(prefix, broker)
    try:
        report = publish_all(
            parse_mqtt_url(broker.url),
            messages,
            client_id=f"{prefix}-pub",
            max_inflight=500,
            protocol="5" if broker.supports_mqtt5 else "3.1.1",
        )
        subscriber.wait_for(len(messages))
    finally:
        subscriber.close()
    assert report.published == len(messages)
    assert report.refused == 0
    assert report.by_kind == dict(Counter(m.kind for m in messages))
    assert report.malformed == sum(not m.valid for m in messages) > 0
    assert Counter(subscriber.received) == Counter((m.topic, m.payload) for m in messages)


def test_run_live_backfills_then_keeps_to_the_wall_clock(broker: EmbeddedBroker) -> None:
    prefix = f"simtest-{uuid.uuid4().hex[:8]}"
    fleet = Fleet(
        pumps=10,
        seed=23,
        start=datetime.now(UTC) - timedelta(days=2),
        interval=timedelta(minutes=2),
        topic_prefix=prefix,
    )
    backlog = 10 * 2 * 720  # two days: ten pumps, one reading every two minutes each
    subscriber = _Subscriber(prefix, broker)
    stop = threading.Event()
    reports: list[PublishReport] = []

    def publish() -> None:
        reports.append(
            run_live(
                parse_mqtt_url(broker.url),
                fleet,
                protocol="5" if broker.supports_mqtt5 else "3.1.1",
                client_id=f"{prefix}-pub",
                accelerate=2 * 86400 / 1.0,  # two days of backlog in about a second
                stop=stop,
            )
        )

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        # However busy the machine, the backlog arrives; then the fleet is live.
        subscriber.wait_for(backlog + 1, timeout_s=120.0)
        assert len(subscriber.received) > backlog
    finally:
        stopped_at = datetime.now(UTC)
        stop.set()
        publisher.join(60)
    try:
        (report,) = reports
        subscriber.wait_for(report.published)
    finally:
        subscriber.close()
    assert report.sim_until is not None
    assert report.sim_until > stopped_at - timedelta(seconds=5)
    assert report.published == len(subscriber.received)
    assert report.published > backlog
    for (_, payload), arrived in zip(subscriber.received, subscriber.arrived_at, strict=True):
        recorded = datetime.fromisoformat(json.loads(payload)["recorded_at"])
        assert recorded <= arrived


def test_a_healthy_fleet_raises_no_alarms_over_a_year() -> None:
    fleet = Fleet(pumps=150, seed=24, start=START, interval=timedelta(hours=12))
    messages = fleet.advance(START + timedelta(days=365))
    alarmed = {
        m.serial for m in messages if m.kind == "telemetry" and json.loads(m.payload)["alarms"]
    }
    assert not alarmed
    refills: dict[str, list[datetime]] = defaultdict(list)
    for message in messages:
        if b'"type":"refill"' in message.payload:
            refills[message.serial].append(message.at)
    assert refills.keys() == {p.serial for p in fleet.pumps}
    apart = [(b - a).days for times in refills.values() for a, b in itertools.pairwise(times)]
    assert min(apart) >= 20
    assert max(apart) <= 180
    assert sum(30 <= days <= 180 for days in apart) > 0.9 * len(apart)  # every 1 to 6 months


def test_a_transit_loss_drops_a_healthy_pumps_readings_that_its_hub_still_holds() -> None:
    fleet = Fleet(
        pumps=6,
        seed=5,
        start=datetime(2026, 1, 1, tzinfo=UTC),
        fault_rates={Fault.GAP: 0.5, Fault.MALFORMED: 0.3},
    )
    loss = TransitLoss(count=3, after=4)
    loss.choose(p.serial for p in [*fleet.healthy(), *fleet.pumps])
    assert loss.serial == fleet.healthy()[0].serial
    devices = DeviceBuffers()
    published = []
    for message in fleet.advance(datetime(2026, 1, 2, tzinfo=UTC)):
        devices.keep(message)
        if not loss.drops(message):
            published.append(message)
    lost = loss.done()
    assert [json.loads(m.payload)["seq"] for m in lost] == [4, 5, 6]
    assert not {m.msg_id for m in lost} & {m.msg_id for m in published}
    hub = json.loads(lost[0].payload)["source"]["id"]
    assert devices.held(loss.serial, hub, 4, 6) == lost  # what a resend gets back
