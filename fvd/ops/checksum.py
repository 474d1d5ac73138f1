"""Format-independent checksums, equal to ovirt-imageio's blkhash
(`ovirt_imageio.client.checksum()`), of an image or a snapshot view.

The algorithm (ovirt_imageio/_internal/blkhash.py): the virtual disk is cut into
`block_size` blocks (the last one may be shorter); each block is hashed on its own
(blake2b/blake2s with digest_size 32, other algorithms with their own size); the outer
hash (same algorithm and digest size) is fed the block digests in order. A block of
zeros hashes like any other block, so its digest is computed once and reused.

Here blocks that the extent map says read as zeros (ZERO and unallocated chunks, base
holes) are never read. Data blocks are read and hashed on a pool of threads (reads and
hashlib release the GIL); their digests are fed to the outer hash in block order.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

from fvd.types import FLAG_ZERO, DiskSource
from fvd.units import flag_runs

if TYPE_CHECKING:
    from typing_extensions import Buffer

Progress = Optional[Callable[[int, int], None]]


class Hash(Protocol):
    """A hashlib object."""

    def update(self, data: Buffer, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


HashFactory = Callable[..., Hash]  # (data=b"") -> Hash

BLOCK_SIZE = 4 << 20
ALGORITHM = "blake2b"
DIGEST_SIZE = 32


def _hash_factory(algorithm: str) -> HashFactory:
    if not isinstance(algorithm, str) or algorithm not in hashlib.algorithms_available:
        known = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))
        raise ValueError(
            f"unknown checksum algorithm {algorithm!r} (choose from {', '.join(known)})"
        )
    try:
        func: HashFactory = getattr(hashlib, algorithm)
    except AttributeError:
        func = partial(hashlib.new, algorithm)
    if algorithm.startswith("blake2"):
        func = partial(func, digest_size=DIGEST_SIZE)
    try:
        func().digest()
    except TypeError as e:  # shake_*: needs a length ovirt-imageio never gives
        raise ValueError(f"checksum algorithm {algorithm!r} is not supported: {e}") from None
    return func


def data_blocks(arr: np.ndarray, size: int, block_size: int) -> np.ndarray:
    """Bool per block: True when some byte of it is not known to read as zeros."""
    nblocks = -(-size // block_size)
    marks = np.zeros(nblocks + 1, dtype=np.int64)
    data = arr[(arr["flags"] & FLAG_ZERO) == 0]
    if len(data):
        first = (data["start"] // np.uint64(block_size)).astype(np.int64)
        last = ((data["start"] + data["length"] - np.uint64(1)) // np.uint64(block_size)).astype(
            np.int64
        )
        np.add.at(marks, first, 1)
        np.add.at(marks, last + 1, -1)
    return np.cumsum(marks[:nblocks]) > 0


def checksum(
    owner: DiskSource,
    block_size: int = BLOCK_SIZE,
    algorithm: str = ALGORITHM,
    *,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """{"algorithm", "block_size", "checksum"} of the virtual disk of `owner`."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size <= 0
        or block_size % 4096
    ):
        raise ValueError(f"block_size must be a positive multiple of 4096, not {block_size!r}")
    func = _hash_factory(algorithm)
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    if owner.closed:
        raise ValueError(f"{owner.path}: I/O on a closed image")
    size = owner.size
    is_data = data_blocks(owner.extents_array(), size, block_size)
    outer = func()
    zero_digest = func(bytes(block_size)).digest()
    local = threading.local()

    def hash_block(k: int) -> bytes:
        start = k * block_size
        n = min(block_size, size - start)
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(block_size)
        view = memoryview(buf)[:n]
        owner.readinto(start, view)
        if n == block_size and buf == zero_block:
            return zero_digest  # data that happens to be zeros: same digest
        return func(view).digest()

    zero_block = bytes(block_size)
    if progress is not None:
        progress(0, size)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fvd-checksum") as pool:
        pending: deque[tuple[int, Future[bytes]]] = deque()
        for a, b, data in flag_runs(is_data):
            if not data:
                while pending:
                    _feed(outer, pending.popleft(), block_size, size, progress)
                _feed_zeros(outer, func, zero_digest, a, b, block_size, size, progress)
                continue
            for k in range(a, b):
                pending.append((k, pool.submit(hash_block, k)))
                while len(pending) > 2 * threads:
                    _feed(outer, pending.popleft(), block_size, size, progress)
        while pending:
            _feed(outer, pending.popleft(), block_size, size, progress)
    return {"algorithm": algorithm, "block_size": block_size, "checksum": outer.hexdigest()}


def _feed(
    outer: Hash, item: tuple[int, Future[bytes]], block_size: int, size: int, progress: Progress
) -> None:
    k, future = item
    outer.update(future.result())
    if progress is not None:
        progress(min(size, (k + 1) * block_size), size)


def _feed_zeros(
    outer: Hash,
    func: HashFactory,
    zero_digest: bytes,
    a: int,
    b: int,
    block_size: int,
    size: int,
    progress: Progress,
) -> None:
    """Blocks [a, b) read as zeros: their digests, without reading or hashing them."""
    full_end = min(b, size // block_size)
    k = a
    while k < full_end:  # batched: a 16 TiB hole is 4 Mi digests
        n = min(full_end - k, 1 << 16)
        outer.update(zero_digest * n)
        k += n
        if progress is not None:
            progress(k * block_size, size)
    if k < b:  # the short last block
        outer.update(func(bytes(size - k * block_size)).digest())
        if progress is not None:
            progress(size, size)
