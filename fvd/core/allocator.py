"""Physical chunk allocation in the data area.

A chunk is in use when the front's lookup table points at it or a snapshot holds it
(refcount > 0, or snapshot metadata). Free chunks below the end are reused lowest first
before the file grows; a chunk the front lets go of becomes reusable only once the
journal record that unmapped it is durable (`commit_frees`), and it is hole-punched
first so that every free chunk reads as zeros.

Grace period: readers and fast-path writers translate through the table without the
image lock, so one may still hold a chunk's old entry after the table let go of it. A
released chunk is therefore *retired* first, tagged with the chunk map's epoch, and
punched and reused only once the epoch has advanced twice (ChunkMap.try_advance: no call
that started before the release is still in flight). Otherwise a reader could read, or a
fast write land in, the chunk after another virtual chunk reused it.
"""

from __future__ import annotations

import errno
import heapq
from typing import Callable, Iterable, Optional, Protocol

import numpy as np

from fvd.ondisk.format import MAX_PHYS_CHUNKS, ZERO_CHUNK
from fvd.units import index_runs


class Grace(Protocol):
    """The chunk map's epoch counter (fvd._impl ChunkMap) that gates reuse."""

    @property
    def epoch(self) -> int: ...

    def try_advance(self) -> bool: ...


PREPARE_AHEAD = 16  # chunks zeroed at once past the end of the data area on a device


class ChunkAllocator:
    def __init__(
        self,
        in_use: np.ndarray,
        punch: Callable[[int, int], object],
        grace: Optional[Grace] = None,
        *,
        limit: int = MAX_PHYS_CHUNKS,
        prepare: Optional[Callable[[int, int], object]] = None,
        full: str = "image full: no physical chunk index left",
    ) -> None:
        """`in_use`: bool array over physical chunks; `punch(first, count)` zeroes chunks;
        `grace`: the chunk map whose epoch gates reuse (None: reuse at once). `limit`:
        chunks that fit (a block device's size), past it allocation fails with ENOSPC
        and the message `full`; `prepare(first, count)` makes chunks past the end read
        as zeros before they are handed out (a block device holds old bytes there)."""
        used = np.flatnonzero(in_use)
        self.end = int(used[-1]) + 1 if len(used) else 0
        self.limit = min(limit, MAX_PHYS_CHUNKS)
        self.full = full
        self.prepare = prepare
        self.prepared = self.end  # chunks below are known to read as zeros when free
        self.free = np.flatnonzero(~in_use[: self.end]).tolist()  # sorted: a valid heap
        self.pending: list[int] = []
        self.retired: list[tuple[int, int]] = []  # (epoch, index): released, not yet reusable
        self.punch = punch
        self.grace = grace

    def allocate(self) -> int:
        if self.retired:
            self.reclaim()
        if self.free:
            return heapq.heappop(self.free)
        return self.allocate_run(1)

    def allocate_run(self, count: int) -> int:
        """`count` contiguous chunks at the end of the data area (snapshot metadata)."""
        first = self.end
        if first + count > self.limit:
            raise OSError(errno.ENOSPC, self.full)
        if self.prepare is not None and first + count > self.prepared:
            start = max(first, self.prepared)
            stop = min(self.limit, first + count + PREPARE_AHEAD)
            self.prepare(start, stop - start)
            self.prepared = stop
        self.end += count
        return first

    def release(self, index: int) -> None:
        """The chunk is no longer used; reusable after the next durable journal write."""
        self.pending.append(index)

    def release_now(self, indexes: Iterable[int]) -> None:
        """Chunks whose release is already durable (e.g. after a header commit)."""
        self._retire(list(indexes))

    def commit_frees(self) -> None:
        pending, self.pending = self.pending, []
        self._retire(pending)

    def abandon(self, indexes: Iterable[int]) -> None:
        """Chunks allocated for an operation that failed before anything pointed at them:
        free again at once (the tail is given back to the end of the data area)."""
        rest = []
        for i in sorted(indexes, reverse=True):
            if i == self.end - 1:
                self.end -= 1
            else:
                rest.append(i)
        self.prepared = min(self.prepared, self.end)  # the given-back tail may hold data
        try:
            self._give_back(rest)
        except OSError:
            pass  # cannot punch: leaked (check -r leaks reclaims them)

    def _retire(self, indexes: list[int]) -> None:
        if not indexes:
            return
        epoch = self.grace.epoch if self.grace is not None else 0
        self.retired.extend((epoch, i) for i in indexes)
        self.reclaim()

    def reclaim(self) -> None:
        """Free the retired chunks no call in flight can still reach."""
        if self.grace is None:
            ready, self.retired = [i for _, i in self.retired], []
        else:
            g = self.grace
            while self.retired and g.epoch < self.retired[-1][0] + 2 and g.try_advance():
                pass
            ready = [i for e, i in self.retired if e + 2 <= g.epoch]
            self.retired = [(e, i) for e, i in self.retired if e + 2 > g.epoch]
        if ready:
            try:
                self._give_back(ready)
            except BaseException:
                self.retired.extend((0, i) for i in ready)  # punch again next time
                raise

    def quiesce(self, sleep: Callable[[float], object]) -> None:
        """Wait until no call that started before now is in flight; free what retired."""
        g = self.grace
        if g is not None:
            target = g.epoch + 2
            while g.epoch < target:
                if not g.try_advance():
                    sleep(0.0001)
        self.reclaim()

    def _give_back(self, indexes: list[int]) -> None:
        for first, count in index_runs(sorted(indexes)):
            self.punch(first, count)
        for i in indexes:
            heapq.heappush(self.free, i)


def front_usage(table: np.ndarray, nphys: int) -> np.ndarray:
    """How many virtual chunks of the front point at each physical chunk."""
    entries = table[table < ZERO_CHUNK]
    return np.bincount(entries, minlength=nphys)
