"""The atheris fuzz target of the decoder and the ingest judge (lab/bench/fuzz_decoder.py):
it runs for a fixed number of iterations and finds nothing, and its checks do catch a decoder
that breaks the contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lab.bench import fuzz_decoder
from services.domain import contract

RUNS = 20_000


def test_the_fuzz_target_runs_a_fixed_number_of_iterations_and_finds_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lab.bench.fuzz_decoder", f"-runs={RUNS}", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"#{RUNS}\tDONE" in done.stderr, done.stderr[-3000:]


def test_every_seed_passes_the_checks() -> None:
    for seed in fuzz_decoder.seeds():
        fuzz_decoder.check_one(seed)


def test_the_checks_catch_a_decoder_that_raises_something_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(kind: contract.Kind, raw: bytes) -> contract.Message:
        raise ValueError("not a Rejected")

    monkeypatch.setattr(contract, "decode", broken)
    with pytest.raises(ValueError, match="not a Rejected"):
        fuzz_decoder.check_one(b"\x00{}")
