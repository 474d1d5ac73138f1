"""Sparse lookup tables (docs/format.md, "Sparse tables"): small footprints at 16 TiB."""

import os
import random
import zlib

import numpy as np
import pytest

import fvd
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table as sp
from fvd.units import KiB, MiB, TiB

BIG = 16 * TiB


def _writes(count, seed=1):
    rng = random.Random(seed)
    return sorted({rng.randrange(BIG // MiB) * MiB for _ in range(count)})


def _clean(path):
    with fvd.open(path) as img:
        result = img.check()
    assert result.corruptions == 0 and result.leaks == 0, result.messages


def test_empty_16tib_image_is_a_hole(impl, tmp_path):
    path = tmp_path / "big.fvd"
    fvd.create(path, BIG)
    assert os.stat(path).st_blocks * 512 < 2 * MiB
    with fvd.open(path, "r+") as img:
        assert img.read(BIG - 4096, 4096) == bytes(4096)
    assert os.stat(path).st_blocks * 512 < 2 * MiB  # the close wrote no table pages
    _clean(path)


def test_scattered_writes_snapshot_writes_only_used_units(impl, tmp_path):
    path = tmp_path / "big.fvd"
    fvd.create(path, BIG)
    offsets = _writes(1000)
    with fvd.open(path, "r+") as img:
        for i, off in enumerate(offsets):
            img.write(off, i.to_bytes(4, "little") * 1024)
        img.flush()
        before = img.stats.metadata_bytes_written
        img.create_snapshot("s1")
        assert img.stats.metadata_bytes_written - before < 2 * MiB
        img.write(offsets[0], b"new!" * 1024)  # copy on write: the snapshot keeps the old
    img = fvd.open(path, "r+")
    with img:
        with img.open_snapshot("s1") as snap:
            assert snap.read(offsets[0], 4) == bytes(4)
            assert snap.read(offsets[-1], 4) == (len(offsets) - 1).to_bytes(4, "little")
        assert img.read(offsets[0], 4) == b"new!"
        for i, off in enumerate(offsets[1:], 1):
            assert img.read(off, 4) == i.to_bytes(4, "little")
        img.write(offsets[1] + MiB // 2, b"w" * 512)  # no allocation: nothing to store
    # this session (open, reads, an overwrite, close) wrote headers, not the 64 MiB table
    assert img.stats.metadata_bytes_written < 2 * MiB
    assert os.stat(path).st_blocks * 512 < 24 * MiB  # 1,000 x 4 KiB data, small tables
    _clean(path)


def test_checkpoint_writes_changed_units_only(impl, tmp_path):
    path = tmp_path / "img.fvd"
    fvd.create(path, TiB)
    with fvd.open(path, "r+") as img:
        for off in _writes(300, seed=2):
            img.write(off % TiB, b"a" * 4096)
    with fvd.open(path, "r+") as img:
        start = img.stats.metadata_bytes_written
        img.write(5 * MiB, b"b" * 4096)  # one new entry
        img.close()
        # header sectors, one journal transaction and one 512-byte table unit
        assert img.stats.metadata_bytes_written - start < 64 * KiB
    _clean(path)


def _to_dense_layout(path):
    """Rewrite a small image as fvd before sparse tables stored it (entries as they
    are, INCOMPAT_SPARSE_TABLE clear): such images must keep working."""
    fd = os.open(path, os.O_RDWR)
    try:
        h = fmt.parse_header(os.pread(fd, fmt.HEADER_SIZE, 0), path, os.fstat(fd).st_size)
        n = -(-h.virtual_size // h.chunk_size)
        table = sp.decode(os.pread(fd, 4 * n, h.table_offset), True)
        raw = table.astype(fmt.TABLE_DTYPE).tobytes()
        os.pwrite(fd, raw, h.table_offset)
        h = h.replace(incompatible_features=h.incompatible_features & ~fmt.INCOMPAT_SPARSE_TABLE)
        h = h.replace(table_crc=zlib.crc32(raw))
        os.pwrite(fd, fmt.build_header(h), 0)
    finally:
        os.close(fd)


def test_dense_tables_still_read_and_written(impl, tmp_path):
    path = str(tmp_path / "old.fvd")
    fvd.create(path, 64 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(3 * MiB, b"c" * 4096)
    _to_dense_layout(path)
    with fvd.open(path, "r+") as img:
        assert img.read(3 * MiB, 4096) == b"c" * 4096
        img.write(7 * MiB, b"d" * 4096)
        img.create_snapshot("s")
        img.write(3 * MiB, b"e" * 4096)
    with fvd.open(path) as img:
        assert not img.info()["incompatible-features"] & fmt.INCOMPAT_SPARSE_TABLE
        assert img.read(7 * MiB, 4096) == b"d" * 4096
        with img.open_snapshot("s") as snap:
            assert snap.read(3 * MiB, 4096) == b"c" * 4096
    _clean(path)


@pytest.mark.parametrize("length", [0, 1, 511, 4096, 123457, 1 << 26])
def test_crc32_of_zero_runs(length):
    for start in (0, 0xDEADBEEF):
        assert sp.crc32_zeros(start, length) == zlib.crc32(bytes(length), start)


def test_stored_crc_hashes_only_nonzero_units():
    table = np.full(100_000, fmt.UNALLOCATED, dtype=np.uint32)
    table[[5, 50_000, 99_999]] = [3, 0, 7]
    stored = sp.encode(table, True)
    mask = sp.nonzero_units(stored)
    assert list(sp.unit_runs(mask)) == [(0, 1), (390, 391), (781, 782)]
    assert sp.stored_crc(stored, mask) == zlib.crc32(stored.tobytes())
    assert (sp.decode(stored.tobytes(), True) == table).all()
    assert table[5] == 3  # encode does not touch the table
