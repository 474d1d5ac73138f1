"""Physical chunk allocation in the data area.

A chunk is in use when the front's lookup table points at it or a snapshot holds it
(refcount > 0, or snapshot metadata). Free chunks below the end are reused lowest first
before the file grows; a chunk the front lets go of becomes reusable only once the
journal record that unmapped it is durable (`commit_frees`), and it is hole-punched
first so that every free chunk reads as zeros.
"""
import heapq

import numpy as np

from .format import MAX_PHYS_CHUNKS, ZERO_CHUNK


class ChunkAllocator:
    def __init__(self, in_use, punch):
        """`in_use`: bool array over physical chunks; `punch(first, count)` zeroes chunks."""
        used = np.flatnonzero(in_use)
        self.end = int(used[-1]) + 1 if len(used) else 0
        self.free = np.flatnonzero(~in_use[:self.end]).tolist()    # sorted: a valid heap
        self.pending = []
        self.punch = punch

    def allocate(self):
        if self.free:
            return heapq.heappop(self.free)
        if self.end >= MAX_PHYS_CHUNKS:
            raise OSError(28, "image full: no physical chunk index left")
        self.end += 1
        return self.end - 1

    def allocate_run(self, count):
        """`count` contiguous chunks at the end of the data area (snapshot metadata)."""
        first = self.end
        if first + count > MAX_PHYS_CHUNKS:
            raise OSError(28, "image full: no physical chunk index left")
        self.end += count
        return first

    def release(self, index):
        """The chunk is no longer used; reusable after the next durable journal write."""
        self.pending.append(index)

    def release_now(self, indexes):
        """Chunks whose release is already durable (e.g. after a header commit)."""
        self._give_back(list(indexes))

    def commit_frees(self):
        pending, self.pending = self.pending, []
        self._give_back(pending)

    def _give_back(self, indexes):
        for first, count in runs(sorted(indexes)):
            self.punch(first, count)
        for i in indexes:
            heapq.heappush(self.free, i)


def runs(sorted_indexes):
    """(first, count) runs of consecutive integers."""
    out = []
    for i in sorted_indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [(a, b) for a, b in out]


def front_usage(table, nphys):
    """How many virtual chunks of the front point at each physical chunk."""
    entries = table[table < ZERO_CHUNK]
    return np.bincount(entries, minlength=nphys)
