"""What ``pumpwatch demo`` keeps in its data directory so that a restart resumes the same clinic.

``demo.json`` (mode 0600: it holds the demo's passwords and its admin key) says which fleet the
simulator runs (seed, size, when it started: the same fleet replays the same history, which
ingest stores once, and goes on live), the admin key, the demo people's emails and passwords,
and which one-off steps are done (the clinic set up, the first visits booked). It is kept only
when the demo runs its embedded PostgreSQL in the same directory: with a configured database the
demo keeps nothing on disk. ``--reset`` removes the data directory and starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

STATE_FILE = "demo.json"
_VERSION = 1
_OURS = (STATE_FILE, "postgres", "mosquitto")
"""What the demo writes in its data directory: a directory holding none of it is not reset."""


@dataclass
class Person:
    email: str
    display_name: str
    role: str
    clinic: str
    """The clinic's name."""
    password: str


@dataclass
class DemoState:
    seed: int
    pumps: int
    start: str
    """When the fleet started (RFC 3339): its history begins there."""
    refill_in_days: float
    """Days from the start to the first refill of the pump with the demo's discrepancy."""
    admin_key: str | None = None
    people: list[Person] = field(default_factory=list)
    set_up: bool = False
    """The clinics, people, patients and pumps are in place (done once; people may change
    them afterwards, and a restart must not undo what they did)."""
    booked: bool = False
    """The first refill visits are booked (once)."""
    version: int = _VERSION

    @property
    def started(self) -> datetime:
        return datetime.fromisoformat(self.start)

    def person(self, email: str) -> Person | None:
        return next((p for p in self.people if p.email == email), None)


def new_state(*, seed: int | None, pumps: int, start: datetime, backfill_days: float) -> DemoState:
    return DemoState(
        seed=seed if seed is not None else secrets.randbelow(1_000_000),
        pumps=pumps,
        start=start.isoformat(),
        refill_in_days=round(backfill_days * 0.6, 3),
    )


def load(data_dir: Path) -> DemoState | None:
    """The state a previous run kept here, or None (none, or one this version cannot read)."""
    path = data_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):  # none there, or not ours to read
        return None
    if not isinstance(raw, dict) or raw.get("version") != _VERSION:
        return None
    try:
        people = [Person(**p) for p in raw.pop("people", [])]
        return DemoState(**raw, people=people)
    except TypeError:
        return None


def save(data_dir: Path, state: DemoState) -> None:
    """Write the state readable by its owner only (0600), atomically."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(state), out, indent=2)
        out.write("\n")
    os.replace(tmp, path)


def reset(data_dir: Path) -> bool:
    """Remove the demo's data directory (False: there was none). Refuses a directory that holds
    none of what the demo writes: a mistyped ``--data-dir`` must not delete someone's files."""
    if not data_dir.exists():
        return False
    if not data_dir.is_dir() or not any((data_dir / name).exists() for name in _OURS):
        raise ValueError(
            f"--reset: {data_dir} does not look like a demo data directory (no "
            f"{', '.join(_OURS)}); remove it yourself if you mean it"
        )
    shutil.rmtree(data_dir)
    return True
