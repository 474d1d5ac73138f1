"""Whole-image prefetch: copy every block still in the base into the image (FVD 2011,
"adaptive prefetching"), then mark the image self-contained (BASE_FLAG_PREFETCHED).

* Reads the base in large sequential pieces (``step``, default 4 MiB) covering the next
  blocks still in the base; each piece is stored with the copy-on-read "soft write"
  (fvd.features.base.BaseLayer.store): under the image lock, only blocks still in the base are
  written, chunk allocation is journaled, bits go to the in-memory bitmap only. A guest
  write that raced ahead wins: its block is present, so prefetch skips it.
* Paced: throughput is measured over windows of at least ``window`` seconds (0.1) and
  smoothed as ewma = alpha * previous + (1 - alpha) * sample (alpha 0.8). Below
  ``min_rate`` (bytes/s, default 5120 KiB/s as in FVD) it pauses, with probability 1/2,
  for a uniform random time in [0, throttle_time] (so contending prefetchers do not all
  pause together). ``max_rate`` (bytes/s, default none) caps the pace.
* Interrupted (crash, exception, KeyboardInterrupt): nothing is lost; bits not yet
  checkpointed are read from the base again, and the next prefetch skips what is present.
* At the end: flush, checkpoint (data synced, then the all-ones bitmap written), then the
  header gets BASE_FLAG_PREFETCHED and the base is closed: the image no longer needs it.
  Unless a snapshot still reads the base (its bitmap copy has a clear bit below the base
  end): then only the front is complete and the base stays attached; a prefetch after
  the last such snapshot is deleted finishes the job.
* Blocks in chunks a snapshot holds (frozen) are stored like a guest write would: the
  chunk is first copied to a new one (Image._prepare_chunks), never written in place.
"""

from __future__ import annotations

import bisect
import random
import sys
import time
from typing import Callable, Optional, TextIO

import numpy as np
import numpy.typing as npt

from fvd.core.bitmap import get_bits
from fvd.core.image import ImageCore
from fvd.features.base import BaseLayer
from fvd.features.snapshots import snapshots_need_base
from fvd.ondisk import format as fmt
from fvd.units import MiB, flag_runs

DEFAULT_STEP = 4 * MiB
DEFAULT_MIN_RATE = 5120 * 1024

Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)
Holes = list[tuple[int, int]]


class Pacer:
    def __init__(
        self,
        min_rate: float = DEFAULT_MIN_RATE,
        max_rate: Optional[float] = None,
        alpha: float = 0.8,
        window: float = 0.1,
        throttle_time: float = 30.0,
        rng: Optional[random.Random] = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_rate, self.max_rate = min_rate, max_rate
        self.alpha, self.window, self.throttle_time = alpha, window, throttle_time
        self.rng = rng or random.Random()
        self.sleep, self.clock = sleep, clock
        self.ewma: Optional[float] = None
        self.pauses = 0
        self._restart()

    def _restart(self) -> None:
        self.t0 = self.clock()
        self.nbytes = 0

    def account(self, nbytes: int) -> None:
        self.nbytes += nbytes
        elapsed = self.clock() - self.t0
        if self.max_rate:
            need = self.nbytes / self.max_rate
            if need > elapsed:
                self.sleep(need - elapsed)
                elapsed = self.clock() - self.t0
        if elapsed < self.window:
            return
        sample = self.nbytes / elapsed
        self.ewma = (
            sample if self.ewma is None else (self.alpha * self.ewma + (1 - self.alpha) * sample)
        )
        if self.min_rate and self.ewma < self.min_rate and self.rng.random() < 0.5:
            self.pauses += 1
            self.sleep(self.rng.uniform(0, self.throttle_time))
            self.ewma = None
        self._restart()


def _present_bytes(flags: npt.NDArray[np.bool_], first_block: int, bs: int, bend: int) -> int:
    """Bytes of the present blocks (the last block may be cut by the base end)."""
    n = int(np.count_nonzero(flags)) * bs
    last = first_block + len(flags) - 1
    if len(flags) and flags[-1] and (last + 1) * bs > bend:
        n -= (last + 1) * bs - bend
    return n


def prefetch(
    img: ImageCore,
    progress: Optional[Progress] = None,
    *,
    step: int = DEFAULT_STEP,
    min_rate: float = DEFAULT_MIN_RATE,
    max_rate: Optional[float] = None,
    alpha: float = 0.8,
    window: float = 0.1,
    throttle_time: float = 30.0,
    rng: Optional[random.Random] = None,
    sleep: Callable[[float], object] = time.sleep,
) -> int:
    """Copy the base into the image; returns the number of bytes copied by this call."""
    img.check_writable()
    h = img.header
    layer = img.base_layer
    if h.base_format == fmt.BASE_NONE or not isinstance(layer, BaseLayer):
        if progress is not None:
            total = min(h.base_size, img.size)
            progress(total, total)
        return 0
    bs = img.block_size
    bend = layer.bend
    nb = -(-bend // bs)
    bitmap = layer.bitmap
    step_blocks = max(1, step // bs)
    holes = _base_holes(layer, bend)
    _zero_hole_chunks(img, layer, holes, nb)
    done = _present_bytes(get_bits(bitmap.fresh, 0, nb), 0, bs, bend) if nb else 0
    total = bend
    if progress is not None:
        progress(done, total)
    pacer = Pacer(min_rate, max_rate, alpha, window, throttle_time, rng, sleep)
    copied = 0
    pos = 0
    buf = bytearray(step_blocks * bs)
    view = memoryview(buf)
    while pos < nb:
        end = min(nb, pos + step_blocks)
        flags = get_bits(bitmap.fresh, pos, end)
        absent = np.flatnonzero(~flags)
        if not len(absent):
            pos = end
            continue
        a, z = pos + int(absent[0]), pos + int(absent[-1]) + 1
        s, e = a * bs, min(z * bs, bend)
        piece = view[: e - s]
        _read_skipping_holes(layer, holes, s, piece)
        copied += layer.store(s, piece)
        done += (e - s) - _present_bytes(flags[a - pos : z - pos], a, bs, bend)
        if progress is not None:
            progress(min(done, total), total)
        pacer.account(e - s)
        pos = z
    _finish(img, layer, nb)
    if progress is not None:
        progress(total, total)
    return copied


def _base_holes(layer: BaseLayer, bend: int) -> Holes:
    """Sorted (start, end) ranges below `bend` where the base reads zeros (a raw base's
    holes, an image base's zero extents): prefetch never reads them."""
    if layer.backend is None:
        return []
    try:
        return [(x.start, x.start + x.length) for x in layer.backend.extents(0, bend) if x.zero]
    except (OSError, NotImplementedError):
        return []


def _zero_hole_chunks(img: ImageCore, layer: BaseLayer, holes: Holes, nb: int) -> None:
    """Whole chunks that read the base and lie in a base hole become ZERO chunks (the
    bits set, as write_zeroes does): nothing to read, nothing to write."""
    cs, bs = img.chunk_size, img.block_size
    per = cs // bs
    for hs, he in holes:
        c0 = -(-hs // cs)
        c1 = (he // cs) if he < layer.bend else -(-he // cs)
        if c1 <= c0:
            continue
        with img.lock:
            if img.closed or img.base_layer is not layer:
                return
            absent = img.table[c0:c1] == fmt.UNALLOCATED
            b0, b1 = c0 * per, min(c1 * per, nb)
            bits = np.zeros((c1 - c0) * per, dtype=bool)
            bits[: b1 - b0] = get_bits(layer.bitmap.fresh, b0, b1)
            absent &= ~bits.reshape(c1 - c0, per).any(axis=1)
            for a, b, ok in flag_runs(absent):
                if ok:
                    img.unmap_chunks(c0 + a, c0 + b)


def _read_skipping_holes(layer: BaseLayer, holes: Holes, start: int, piece: memoryview) -> None:
    """Fill `piece` (virtual `start`) from the base; base holes are zero-filled, not read."""
    end = start + len(piece)
    pos = start
    i = bisect.bisect_right(holes, (start, end)) - 1
    i = max(i, 0)
    while pos < end:
        while i < len(holes) and holes[i][1] <= pos:
            i += 1
        if i < len(holes) and holes[i][0] <= pos:
            stop = min(end, holes[i][1])
            piece[pos - start : stop - start] = bytes(stop - pos)
        else:
            stop = min(end, holes[i][0]) if i < len(holes) else end
            layer.base_read(pos, piece[pos - start : stop - start])
        pos = stop


def _finish(img: ImageCore, layer: BaseLayer, nb: int) -> None:
    img.flush()
    with img.lock:
        if nb and not get_bits(layer.bitmap.fresh, 0, nb).all():
            return  # a block could not be stored (image closing): try again later
        img.dirty_since_checkpoint = True
        img.checkpoint(clean=False)
        if img.snapshot_state is not None and img.snapshot_state.has_snapshots():
            if snapshots_need_base(img):
                return  # the front is complete, but a snapshot still reads the base
        img.write_header(base_flags=img.header.base_flags | fmt.BASE_FLAG_PREFETCHED)
        img.sync()
        img.base_layer = None
        layer.close()


def progress_bar(stream: Optional[TextIO] = None, width: int = 40) -> Progress:
    """A progress(done, total) callback drawing a one-line bar on `stream` (stderr)."""
    out = stream or sys.stderr
    state: dict[str, Optional[str]] = {"last": None}

    def show(done: int, total: int) -> None:
        pct = 100.0 if total == 0 else 100.0 * done / total
        filled = int(width * pct / 100)
        text = f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:6.2f}% ({done}/{total} bytes)"
        if text != state["last"]:
            out.write(text)  # the caller ends the line when done
            out.flush()
            state["last"] = text

    return show
