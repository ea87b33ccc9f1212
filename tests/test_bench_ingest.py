"""``pumpwatch bench ingest`` as a command: both publishers (the simulator's paho client and
``mosquitto_pub``) deliver the whole stream to the bare subscriber and to the real ingest, and the
command prints its figures; ``pumpwatch bench writer``: ingest's batch writer alone stores the
same stream and prints CPU per message of each part. They assert counts, never a rate or a
time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MESSAGES = 2_000


def _bench(database_url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``pumpwatch bench ARGS`` as a new process (on this PostgreSQL when given)."""
    env = {**os.environ, "COLUMNS": "160"}
    if database_url is not None:
        env["PUMPWATCH_DATABASE_URL"] = database_url
    return subprocess.run(
        [str(Path(sys.executable).with_name("pumpwatch")), "bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("publisher", ["paho", "mosquitto_pub"])
def test_bench_ingest_stores_the_whole_stream(publisher: str, pg_admin_url: str) -> None:
    for binary in ("mosquitto", "mosquitto_sub", "mosquitto_pub"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            pytest.skip(f"needs {binary} (apt install mosquitto mosquitto-clients)")
    args = ("--messages", str(MESSAGES), "--pumps", "20", "--publisher", publisher)
    done = _bench(pg_admin_url, "ingest", *args)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(rf"publisher\s+{publisher}\b", output), output
    row = re.search(r"delivered / stored\s*│\s*([\d,]+)\s*│\s*([\d,]+)", output)
    assert row is not None, output
    assert [int(n.replace(",", "")) for n in row.groups()] == [MESSAGES, MESSAGES], output
    assert re.search(r"CPU µs/msg: ingest\s*│\s*-\s*│\s*\d+", output), output


def test_bench_ingest_refuses_an_unknown_publisher() -> None:
    done = _bench(None, "ingest", "--publisher", "x")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--publisher" in done.stderr, done.stderr


def test_bench_writer_stores_the_whole_stream_and_prints_its_figures(pg_admin_url: str) -> None:
    done = _bench(pg_admin_url, "writer", "--messages", str(MESSAGES), "--pumps", "20")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    stored = re.search(r"messages stored \(readings \+ events\)\s*│\s*([\d,]+)", output)
    assert stored is not None, output
    assert int(stored.group(1).replace(",", "")) == MESSAGES, output
    for part in ("judging", "storing", "PostgreSQL"):
        figure = re.search(rf"CPU µs/msg: {part}\s*│\s*([\d.]+)", output)
        assert figure is not None, (part, output)
        assert float(figure.group(1)) > 0, (part, output)


def test_bench_writer_stores_the_stream_with_each_variant_in_turn(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """A variant is an edited copy of ingest's statements (here: without the hourly rollup), with
    an SQL file for its database if it needs one; every contender stores the whole stream on its
    own database, and each prints its figure."""
    statements = Path(__file__).parents[1] / "services" / "ingest" / "sql.py"
    text = statements.read_text("utf-8")
    start, end = text.index("), hourly AS ("), text.index("SELECT s.msg_id FROM stage_readings s")
    variant = tmp_path / "no_rollup.py"
    variant.write_text(text[:start] + ")\n" + text[end:], "utf-8")
    setup = tmp_path / "setup.sql"
    setup.write_text("ALTER TABLE readings_hourly SET (fillfactor = 90)", "utf-8")
    done = _bench(
        pg_admin_url,
        "writer",
        "--messages",
        str(MESSAGES),
        "--pumps",
        "20",
        "--variant",
        f"no-rollup={variant},{setup}",
        "--variant",
        f"same={statements}",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    row = r"│ (current|no-rollup|same)\s*│\s*([\d,]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)"
    rows = re.findall(row, output)
    assert [r[0] for r in rows] == ["current", "no-rollup", "same"], output
    assert [int(r[1].replace(",", "")) for r in rows] == [MESSAGES] * 3, output
    assert all(float(r[2]) > 0 for r in rows), output
    assert rows[0][3] == "1.000", output


def test_a_variants_setup_runs_on_its_database(pg_admin_url: str, tmp_path: Path) -> None:
    statements = Path(__file__).parents[1] / "services" / "ingest" / "sql.py"
    setup = tmp_path / "setup.sql"
    setup.write_text("SELECT no_such_function()", "utf-8")
    done = _bench(pg_admin_url, "writer", "--messages", str(MESSAGES), "--variant",
                  f"x={statements},{setup}")  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    assert "no_such_function" in done.stdout + done.stderr


def test_bench_writer_refuses_a_variant_it_cannot_read(tmp_path: Path) -> None:
    done = _bench(None, "writer", "--variant", f"x={tmp_path / 'missing.py'}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no file" in done.stderr, done.stderr
    done = _bench(None, "writer", "--variant", "no-equals-sign")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "LABEL=STATEMENTS.py" in done.stderr, done.stderr
