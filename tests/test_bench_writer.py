"""``pumpwatch bench writer`` as a command: ingest's batch writer stores the whole stream and the
command prints CPU per message for each part. It asserts counts, never a rate or a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

MESSAGES = 2_000


def test_bench_writer_stores_the_whole_stream_and_prints_its_figures(pg_admin_url: str) -> None:
    env = {**os.environ, "PUMPWATCH_DATABASE_URL": pg_admin_url, "COLUMNS": "160"}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("pumpwatch")),
            "bench",
            "writer",
            "--messages",
            str(MESSAGES),
            "--pumps",
            "20",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    stored = re.search(r"messages stored \(readings \+ events\)\s*│\s*([\d,]+)", output)
    assert stored is not None, output
    assert int(stored.group(1).replace(",", "")) == MESSAGES, output
    for part in ("judging", "storing", "PostgreSQL"):
        figure = re.search(rf"CPU µs/msg: {part}\s*│\s*([\d.]+)", output)
        assert figure is not None, (part, output)
        assert float(figure.group(1)) > 0, (part, output)
