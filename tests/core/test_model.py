"""Model-based test: a hypothesis state machine against a bytearray model.

Steps: writes and zeroes at any alignment, reads, flush, reopen, and two kinds of crash:
a power cut that drops every write since the last flush (the file is put back to its
state at the last fdatasync) and a process crash that keeps the page cache.
"""

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

import fvd
from fvd.units import KiB

from ..helpers import DurableRecorder, assert_old_or_new, image_data_rules

SIZE = 2 * 1024 * KiB + 3 * KiB  # not a multiple of the chunk size
CHUNK = 64 * KiB


def make_machine(path, recorder, cache):
    class ImageMachine(image_data_rules(SIZE, max_write=200 * KiB)):
        @initialize()
        def setup(self):
            if os.path.exists(path):
                os.unlink(path)
            fvd.create(path, SIZE, chunk_size=CHUNK, journal_size=64 * KiB)
            recorder.snapshot_now()
            self.img = fvd.open(path, "r+", cache=cache)
            self.model = bytearray(SIZE)  # what reads must return now
            self.durable = bytearray(SIZE)  # what survives a power cut
            self.between = []  # writeback: states acknowledged since the last flush
            self.seed = 0

        def _ack(self):
            if cache == "writethrough":
                self.durable[:] = self.model
            else:
                self.between.append(bytes(self.model))

        def _durable_now(self):
            self.durable[:] = self.model
            self.between = []

        @rule()
        def flush(self):
            self.img.flush()
            self._durable_now()

        @rule()
        def reopen(self):
            self.img.close()
            self.img = fvd.open(path, "r+", cache=cache)
            self._durable_now()

        @rule()
        def power_cut(self):
            self.img._crash()
            recorder.power_cut()
            self.img = fvd.open(path, "r+", cache=cache)
            got = self.img.read(0, SIZE)
            assert got == self.durable
            self.model[:] = self.durable
            self.between = []

        @rule()
        def process_crash(self):
            self.img._crash()
            self.img = fvd.open(path, "r+", cache=cache)
            got = self.img.read(0, SIZE)
            # writeback: any unflushed write may have reached the file, in any subset
            assert_old_or_new(got, self.model, self.durable, self.between)
            self.model[:] = got
            self._durable_now()

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
