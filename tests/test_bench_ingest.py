"""``pumpwatch bench ingest`` as a command: both publishers (the simulator's paho client and
``mosquitto_pub``) deliver the whole stream to the bare subscriber and to the real ingest, and the
command prints its figures. It asserts counts, never a rate or a time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MESSAGES = 2_000


@pytest.mark.slow
@pytest.mark.parametrize("publisher", ["paho", "mosquitto_pub"])
def test_bench_ingest_stores_the_whole_stream(publisher: str, pg_admin_url: str) -> None:
    for binary in ("mosquitto", "mosquitto_sub", "mosquitto_pub"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            pytest.skip(f"needs {binary} (apt install mosquitto mosquitto-clients)")
    env = {**os.environ, "PUMPWATCH_DATABASE_URL": pg_admin_url, "COLUMNS": "160"}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("pumpwatch")),
            "bench",
            "ingest",
            "--messages",
            str(MESSAGES),
            "--pumps",
            "20",
            "--publisher",
            publisher,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(rf"publisher\s+{publisher}\b", output), output
    row = re.search(r"delivered / stored\s*│\s*([\d,]+)\s*│\s*([\d,]+)", output)
    assert row is not None, output
    assert [int(n.replace(",", "")) for n in row.groups()] == [MESSAGES, MESSAGES], output
    assert re.search(r"CPU µs/msg: ingest\s*│\s*-\s*│\s*\d+", output), output


def test_bench_ingest_refuses_an_unknown_publisher() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pumpwatch")), "bench", "ingest", "--publisher", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--publisher" in done.stderr, done.stderr
