"""A device account speaks and reads for its own pump only (security audit, finding 7).

The production broker configuration (``deploy/mosquitto/secure``: its ACL, a password file from
``make-passwd.sh``, TLS certificates from ``gen-dev-certs.sh``) runs on spare ports, with the real
``pumpwatch ingest`` connected with its own account. The development device account
``NGPDEV0001`` publishes its pump's readings and events (a simulated fleet's pump, renamed) and,
interleaved, every message of N other pumps of the fleet under their serials (telemetry and
events): half over MQTT 5 (the broker answers PUBACK 0x87 "Not authorized"), half over MQTT 3.1.1
(acknowledged and dropped). Every forged message is one ingest's judge accepts: only the ACL
stands between it and the database. A second device account (``NGPDEV0002``, another pump)
publishes its own readings as a control: another pump's messages are stored when they come from
its own account.

Commands: one of the device's own readings is held back, so ingest's backfill asks the device
(``pumps/NGPDEV0001/commands``) to resend it, and the device does. The ingest account also sends
a command to each of the N other pumps; the device, subscribed to ``pumps/+/commands`` and (on
another connection) to ``pumps/#``, must receive none of them, nor the neighbour's readings.

History: attempted, acknowledged, stored, lost and duplicated count the device's own messages.
Figures: forged attempted, refused, routed (an observer account reads everything) and stored
(must be 0), commands for other pumps and how many reached the device (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial

import msgspec
import paho.mqtt.client as paho

from lab.bench.faults.common import (
    STORED_IDS,
    Lab,
    Outcome,
    Size,
    check_stored,
    days_before_now,
    fetchval,
    ingest_service,
    wait_until,
)
from lab.secure_broker import DEVICE, OBSERVER, MqttClient, start_secure_mosquitto
from lab.sim.fleet import Fleet, Outgoing
from services.domain.contract import decode_resend, encode_resend
from services.ingest.backlog import Incoming
from services.ingest.judge import Rules, judge
from services.ingest.settings import IngestSettings

NEIGHBOUR = "NGPDEV0002"
"""Another pump's device account (the control): its own readings are stored."""
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class DevicesSize:
    other_pumps: int
    """Pumps whose serials the device tries to speak for."""
    days: int
    interval_h: int
    """Each pump's history: one reading per ``interval_h`` over ``days``, and its events."""


SIZES: dict[Size, DevicesSize] = {
    "reduced": DevicesSize(other_pumps=20, days=60, interval_h=12),
    "full": DevicesSize(other_pumps=200, days=60, interval_h=6),
}


def renamed(message: Outgoing, serial: str) -> Outgoing:
    """The same message from the pump ``serial`` (payload and topic)."""
    doc = json.loads(message.payload)
    doc["serial"] = serial
    topic = f"pumps/{serial}/{message.kind}"
    return replace(message, topic=topic, payload=json.dumps(doc).encode(), serial=serial)


def _seq(message: Outgoing) -> tuple[str, int]:
    doc = json.loads(message.payload)
    return str(doc["source"]["id"]), int(doc["seq"])


def _accepted_by_ingest(messages: list[Outgoing]) -> int:
    """How many of ``messages`` ingest's judge accepts (schema, topic, serial, clock)."""
    settings = IngestSettings.model_construct()
    rules = Rules(
        topic_prefix="",
        max_future=timedelta(seconds=settings.ingest_clock_skew_max_s),
        oldest=settings.ingest_oldest_recorded_at,
    )
    now = datetime.now(UTC)
    batch = [Incoming(i, 1, m.topic, m.payload, time.time(), 0) for i, m in enumerate(messages)]
    return len(judge(batch, rules, now).accepted)


def _received(client: MqttClient, message: tuple[str, bytes]) -> bool:
    return message in list(client.messages)


def run(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline, in order
    spec = SIZES[size]
    outcome = Outcome("devices", "a device account speaks and reads for its own pump only")
    started = time.monotonic()
    # The fleet: the device's pump (the one with the most events), the neighbour, the others.
    fleet = Fleet(
        pumps=spec.other_pumps + 2,
        seed=seed,
        start=days_before_now(spec.days),
        interval=timedelta(hours=spec.interval_h),
    )
    stream = fleet.advance(datetime.now(UTC) - timedelta(minutes=5))
    events = Counter(m.serial for m in stream if m.kind == "events")
    serials = sorted({m.serial for m in stream}, key=lambda s: (-events[s], s))
    mine, neighbour_serial = serials[0], serials[1]
    own = [renamed(m, DEVICE) for m in stream if m.serial == mine]
    neighbour = [renamed(m, NEIGHBOUR) for m in stream if m.serial == neighbour_serial]
    forged = [m for m in stream if m.serial not in (mine, neighbour_serial)]
    others = sorted({m.serial for m in forged})
    outcome.check(len(others) == spec.other_pumps, f"forged for {len(others)} pumps only")
    if not outcome.check(
        any(m.kind == "events" for m in own) and any(m.kind == "events" for m in forged),
        "the stream has no events for the device or the other pumps",
    ):
        return outcome
    accepted = _accepted_by_ingest([*own, *forged])
    outcome.check(
        accepted == len(own) + len(forged),
        f"ingest's judge accepts only {accepted} of {len(own) + len(forged)} messages: the ACL "
        f"would not be the only thing stopping the forged ones",
    )
    # One of the device's readings held back (a gap): backfill asks for it.
    telemetry = [m for m in own if m.kind == "telemetry"]
    held = telemetry[len(telemetry) // 2]
    # Each own stream on one connection, in order (readings on MQTT 5, events on 3.1.1), the
    # forged ones interleaved in time, half on each; every forged message before the last own
    # one of its connection.
    rng = random.Random(seed)
    split: dict[int, list[Outgoing]] = {5: [], 4: []}
    for message in forged:
        split[rng.choice((5, 4))].append(message)
    plans: dict[int, list[Outgoing]] = {}
    for version, kind in ((5, "telemetry"), (4, "events")):
        mine_here = [m for m in own if m.kind == kind and m is not held]
        plans[version] = [
            *sorted([*mine_here[:-1], *split[version]], key=lambda m: m.at),
            mine_here[-1],
        ]

    broker = start_secure_mosquitto(lab.path("broker"), more_devices=[NEIGHBOUR])
    lab.stack.callback(broker.stop)
    database_url = lab.database()
    ingest = ingest_service(lab, database_url, broker.url("pumpwatch-ingest"))
    ingest.start()
    observer = broker.connect(OBSERVER)
    observer.subscribe("#")
    clients = {5: broker.connect(DEVICE), 4: broker.connect(DEVICE, protocol=paho.MQTTv311)}
    device = clients[5]
    device.subscribe("pumps/+/commands")
    snoop = broker.connect(DEVICE, protocol=paho.MQTTv311)
    for topic in ("pumps/#", "#"):
        snoop.subscribe(topic)

    # Publish: the device (its own and the forged), then the neighbour (its own).
    own_ids = {m.msg_id for m in own}
    refused: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    """Forged publishes over MQTT 5 answered otherwise than 0x87, by reason."""
    acked_own = 0
    for version, plan in plans.items():
        reasons = clients[version].publish_many([(m.topic, m.payload) for m in plan])
        for message, reason in zip(plan, reasons, strict=True):
            is_own = message.msg_id in own_ids
            if is_own:
                acked_own += 0 if reason.is_failure else 1
                outcome.check(not reason.is_failure, f"own {message.topic} refused: {reason}")
            elif reason.value == NOT_AUTHORIZED:
                refused[f"MQTT {'5' if version == 5 else '3.1.1'}"] += 1
            elif version == 5:
                passed[str(reason)] += 1
    neighbour_reasons = broker.connect(NEIGHBOUR).publish_many(
        [(m.topic, m.payload) for m in neighbour]
    )
    outcome.check(
        not any(r.is_failure for r in neighbour_reasons), "the neighbour's own messages refused"
    )

    def routed(serials: set[str]) -> list[str]:
        return [
            topic
            for topic, _ in list(observer.messages)
            if topic.split("/")[1] in serials and not topic.endswith("/commands")
        ]

    wait_until(
        lambda: len(routed({DEVICE, NEIGHBOUR})) >= len(own) - 1 + len(neighbour),
        "the observer to receive the device's and the neighbour's messages",
        timeout_s=60,
    )
    forged_routed = len(routed(set(others)))

    # Commands: one for each other pump from the ingest account, then one for the device.
    commander = broker.connect("pumpwatch-ingest")
    now = datetime.now(UTC)
    commands = [
        (f"pumps/{serial}/commands", encode_resend("HUB-0", 0, 0, f"faults-{serial}", now))
        for serial in others
    ]
    control = encode_resend("HUB-0", 0, 0, "faults-control", now)
    command_reasons = commander.publish_many([*commands, (f"pumps/{DEVICE}/commands", control)])
    outcome.check(
        not any(r.is_failure for r in command_reasons), "the ingest account's commands refused"
    )
    own_commands = f"pumps/{DEVICE}/commands"
    for client in (device, snoop):
        wait_until(
            partial(_received, client, (own_commands, control)),
            "the device to receive its own command",
            timeout_s=30,
        )
    wait_until(
        lambda: (
            len([t for t, _ in list(observer.messages) if t.endswith("/commands")])
            >= len(commands) + 1
        ),
        "the observer to receive every command",
        timeout_s=30,
    )

    # Backfill: ingest asks the device for the held reading; the device resends it.
    source, seq = _seq(held)

    def resend_request() -> tuple[int, int] | None:
        for topic, payload in list(device.messages):
            if topic != own_commands or payload == control:
                continue
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                command = decode_resend(payload)
                if command.source_id == source and command.from_seq <= seq <= command.to_seq:
                    return command.from_seq, command.to_seq
        return None

    wait_until(
        lambda: resend_request() is not None,
        "ingest's backfill to ask the device for the held reading",
        timeout_s=120,
        alive=ingest,
    )
    low, high = resend_request() or (seq, seq)
    answer = [m for m in own if m.kind == "telemetry" and low <= _seq(m)[1] <= high]
    acked_own += sum(
        not r.is_failure for r in device.publish_many([(m.topic, m.payload) for m in answer])
    )

    wanted = [*own, *neighbour]
    wait_until(
        lambda: asyncio.run(check_stored(database_url, wanted)).stored == len(wanted),
        "ingest to store the device's and the neighbour's messages",
        timeout_s=120,
        every_s=0.5,
        alive=ingest,
    )
    stored = asyncio.run(check_stored(database_url, wanted))
    forged_ids = [m.msg_id for m in forged]
    forged_stored = int(
        asyncio.run(
            fetchval(
                database_url,
                f"SELECT count(*) FROM ({STORED_IDS}) s WHERE msg_id = ANY($1::text[])",
                forged_ids,
            )
        )
    )
    foreign_pumps = int(
        asyncio.run(
            fetchval(
                database_url,
                "SELECT count(*) FROM pumps WHERE serial <> ALL($1::text[])",
                [DEVICE, NEIGHBOUR],
            )
        )
    )
    outcome.check(ingest.alive, "ingest died")
    outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")

    foreign_to_device = [t for t, _ in device.messages if t != own_commands]
    foreign_to_snoop = [t for t, _ in snoop.messages if t != own_commands]
    own_count = len(own)
    outcome.attempted = own_count
    outcome.acknowledged = acked_own
    own_check = asyncio.run(check_stored(database_url, own))
    outcome.stored = own_check.stored
    outcome.lost = len(own_check.lost)
    outcome.duplicated = own_check.duplicated

    kinds = Counter(m.kind for m in forged)
    outcome.figures["other pumps the device tried to speak for"] = f"{len(others):,}"
    outcome.figures["forged messages attempted (telemetry / events)"] = (
        f"{len(forged):,} ({kinds['telemetry']:,} / {kinds['events']:,}); "
        f"MQTT 5 {len(split[5]):,}, MQTT 3.1.1 {len(split[4]):,}"
    )
    outcome.figures["forged refused with PUBACK 0x87 (MQTT 5)"] = (
        f"{refused['MQTT 5']:,} of {len(split[5]):,}"
    )
    outcome.figures["forged routed by the broker (observer) / stored"] = (
        f"{forged_routed:,} / {forged_stored:,}"
    )
    outcome.figures["pumps in the database other than the two devices'"] = str(foreign_pumps)
    outcome.figures["own messages (readings / events): published, stored"] = (
        f"{own_count:,} ({len(telemetry):,} / {own_count - len(telemetry):,}), {own_check.stored:,}"
    )
    outcome.figures["own reading held back, asked for by ingest's backfill, resent"] = (
        f"seq {seq} of {source}: asked for {low}..{high}, resent {len(answer)}"
    )
    outcome.figures["neighbour's own messages (control): published, stored"] = (
        f"{len(neighbour):,}, {stored.stored - own_check.stored:,}"
    )
    outcome.figures["commands for other pumps: published / reaching the device"] = (
        f"{len(commands):,} / {len(foreign_to_device) + len(foreign_to_snoop):,}"
    )
    outcome.figures["the device's own commands received (control + backfill)"] = str(
        sum(1 for t, _ in device.messages if t == own_commands)
    )
    outcome.check(len(split[5]) > 0 and len(split[4]) > 0, "nothing forged on one connection")
    outcome.check(not passed, f"forged publishes over MQTT 5 answered {dict(passed)}")
    outcome.check(
        refused["MQTT 5"] == len(split[5]),
        f"MQTT 5: {refused['MQTT 5']} of {len(split[5])} forged refused with 0x87",
    )
    outcome.check(forged_routed == 0, f"the broker routed {forged_routed} forged messages")
    outcome.check(forged_stored == 0, f"{forged_stored} forged messages stored")
    outcome.check(foreign_pumps == 0, f"{foreign_pumps} other pumps appeared in the database")
    outcome.check(stored.unexpected == 0, f"{stored.unexpected} unexpected messages stored")
    outcome.check(stored.stored == len(wanted), "the neighbour's own messages were not all stored")
    outcome.check(
        not foreign_to_device and not foreign_to_snoop,
        f"other pumps' messages reached the device: "
        f"{sorted({*foreign_to_device, *foreign_to_snoop})[:5]}",
    )
    outcome.elapsed_s = time.monotonic() - started
    return outcome
