"""Model-based test: a hypothesis state machine against a bytearray model.

Steps: writes and zeroes at any alignment, reads, flush, reopen, and two kinds of crash:
a power cut that drops every write since the last flush (the file is put back to its
state at the last fdatasync) and a process crash that keeps the page cache.
"""

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

import fvd
from fvd.units import KiB

from ..helpers import DurableRecorder, pattern

SIZE = 2 * 1024 * KiB + 3 * KiB  # not a multiple of the chunk size
CHUNK = 64 * KiB


def make_machine(path, recorder, cache):
    class ImageMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            if os.path.exists(path):
                os.unlink(path)
            fvd.create(path, SIZE, chunk_size=CHUNK, journal_size=64 * KiB)
            recorder.snapshot_now()
            self.img = fvd.open(path, "r+", cache=cache)
            self.model = bytearray(SIZE)  # what reads must return now
            self.durable = bytearray(SIZE)  # what survives a power cut
            self.seed = 0

        def _acknowledged(self):
            if cache == "writethrough":
                self.durable[:] = self.model

        @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 200 * KiB))
        def write(self, off, n):
            n = min(n, SIZE - off)
            self.seed += 1
            data = pattern(self.seed, n)
            self.img.write(off, data)
            self.model[off : off + n] = data
            self._acknowledged()

        @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 400 * KiB))
        def zeroes(self, off, n):
            n = min(n, SIZE - off)
            self.img.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)
            self._acknowledged()

        @rule(off=st.integers(0, SIZE - 1), n=st.integers(0, 300 * KiB))
        def read(self, off, n):
            n = min(n, SIZE - off)
            assert self.img.read(off, n) == self.model[off : off + n]

        @rule()
        def flush(self):
            self.img.flush()
            self.durable[:] = self.model

        @rule()
        def reopen(self):
            self.img.close()
            self.img = fvd.open(path, "r+", cache=cache)
            self.durable[:] = self.model

        @rule()
        def power_cut(self):
            self.img._crash()
            recorder.power_cut()
            self.img = fvd.open(path, "r+", cache=cache)
            got = self.img.read(0, SIZE)
            assert got == self.durable
            self.model[:] = self.durable

        @rule()
        def process_crash(self):
            self.img._crash()
            self.img = fvd.open(path, "r+", cache=cache)
            got = self.img.read(0, SIZE)
            for i in range(0, SIZE, 4096):
                new, old, b = (
                    self.model[i : i + 4096],
                    self.durable[i : i + 4096],
                    got[i : i + 4096],
                )
                if b != new and b != old:
                    for j in range(len(b)):
                        assert b[j] in (new[j], old[j]), f"byte {i + j} from elsewhere"
            self.model[:] = got
            self.durable[:] = got

        def teardown(self):
            if hasattr(self, "img"):
                self.img.close()
                with fvd.open(path) as img:
                    assert img.read(0, SIZE) == self.model
                    result = img.check()
                    assert result.corruptions == 0, result.messages

    return ImageMachine


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_image_against_model(tmp_path, monkeypatch, cache):
    path = str(tmp_path / "model.fvd")
    recorder = DurableRecorder(monkeypatch, path)
    machine = make_machine(path, recorder, cache)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("FVD_MODEL_EXAMPLES", "25")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
