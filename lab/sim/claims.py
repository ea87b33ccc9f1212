"""Claim codes: the clinician programmer of a clinic that has a pump nobody holds in pumpwatch.

While it interrogates the pump it shows a code and publishes a ``claim`` event (MQTT contract
1.1): ``{"code": 6-12 letters and digits, "expires_at": at most 1 h after recorded_at}``. A
clinic that enters the code before it expires takes custody of the pump (HTTP contract 1.1).

A :class:`ClaimProgrammer` shows a new code every ``every_s`` from ``from_t`` on, each valid for
an hour. It is a source of its own (the clinic's programmer, not the pump's usual one), with its
own sequence numbers and random stream, so the pump's other messages are the same with or
without it: a fleet started again with later claims replays the same history.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import msgspec

from lab.sim.outgoing import Outgoing
from lab.sim.pump import uuid4_text
from services.domain.contract import CLAIM_LIFETIME

CLAIM_EVERY = timedelta(minutes=20)
"""How often the programmer shows a new code (each valid for :data:`CLAIM_LIFETIME`)."""
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
"""Letters and digits a nurse does not misread (no I, O, 0, 1)."""
_CODE_LENGTH = 8


class ClaimProgrammer:
    """The claim events of one pump, as a stream the fleet merges by ``next_at``."""

    finished = False

    def __init__(
        self, serial: str, *, seed: int, from_t: int, every_s: int, topic_prefix: str
    ) -> None:
        if every_s < 1:
            raise ValueError("claims need a period of at least one second")
        self.serial = serial
        self._seed = seed
        self._every_s = every_s
        # On the period's grid: the same moments (and codes) however the fleet was started.
        self.next_at = math.ceil(from_t / every_s) * every_s
        base = f"{topic_prefix}/pumps" if topic_prefix else "pumps"
        self._topic = f"{base}/{serial}/events"
        device = random.Random(f"pumpwatch-sim:{seed}:{serial}:claims").randint(1000, 9999)
        self._source = {
            "kind": "clinician_programmer",
            "id": f"PRG-{device}C",
            "firmware": "3.2.2",
        }
        self._seq = 0

    def step(self) -> Outgoing:
        t = self.next_at
        self.next_at += self._every_s
        rng = random.Random(f"pumpwatch-sim:{self._seed}:{self.serial}:claim:{t}")
        code = "".join(rng.choice(_CODE_ALPHABET) for _ in range(_CODE_LENGTH))
        at = datetime.fromtimestamp(t, UTC)
        msg_id = uuid4_text(rng.getrandbits(128))
        doc = {
            "v": 1,
            "msg_id": msg_id,
            "serial": self.serial,
            "seq": self._seq,
            "recorded_at": at.isoformat(),
            "source": self._source,
            "type": "claim",
            "claim": {"code": code, "expires_at": (at + CLAIM_LIFETIME).isoformat()},
        }
        self._seq += 1
        return Outgoing(
            self._topic, msgspec.json.encode(doc), "events", msg_id, self.serial, True, at
        )
