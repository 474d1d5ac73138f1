"""Issue 8, bug 12: fvd.qcow2 bounds every offset by the file, refuses metadata overlaps,
and a repair that reports success leaves an image that opens and checks clean."""

import struct

import pytest

import fvd
import fvd.qcow2 as q

CS = 64 * 1024


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def be64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "img.qcow2")
    q.create(path, 24 * CS, cluster_size=CS)
    with q.open(path, "r+") as img:
        for i in (0, 1, 3, 6):
            img.write(i * CS, bytes([i + 1]) * 5000)
        img.create_snapshot("s", vm_state=b"vm" * 100)
        img.write(CS, b"\x55" * 100)
    return path


def layout(path):
    return {"l1": be64(path, 40), "reftable": be64(path, 48), "snapshots": be64(path, 64)}


def test_check_memory_bounded_by_file_size(image):
    rt = layout(image)["reftable"]
    patch(image, rt + 8, struct.pack(">Q", 1 << 55))  # a refcount block far away
    with q.open(image) as img:
        result = img.check()
    assert result.corruptions >= 1 and not result.ok


@pytest.mark.parametrize("target", ["l1", "reftable", "snapshots"])
def test_l1_entry_into_metadata_is_refused(image, target):
    where = layout(image)
    patch(image, where["l1"], struct.pack(">Q", where[target] | 1 << 63))
    for mode in ("r", "r+"):
        with pytest.raises(fvd.CorruptImageError) as info:
            q.open(image, mode)
        assert info.value.offset == where["l1"] and image in str(info.value)


def test_two_refcount_table_entries_sharing_a_block(image):
    rt = layout(image)["reftable"]
    patch(image, rt + 24, struct.pack(">Q", be64(image, rt)))
    with pytest.raises(fvd.CorruptImageError):
        q.open(image, "r+")


def test_metadata_with_refcount_zero_refuses_writes_until_repaired(image):
    rt = layout(image)["reftable"]
    block = be64(image, rt)
    l1 = layout(image)["l1"]
    l2 = be64(image, l1) & 0x00FFFFFFFFFFFE00
    patch(image, block + 2 * (l2 // CS), b"\0\0")  # the active L2 table counts 0
    with q.open(image, "r+") as img:
        with pytest.raises(fvd.CorruptImageError):
            img.write(10 * CS, b"x" * CS)  # would allocate over the L2 table
        result = img.check(repair=True)
        assert result.ok and result.corruptions_fixed >= 1
        img.write(10 * CS, b"x" * CS)
    with q.open(image) as img:
        assert img.check().ok
        assert img.read(10 * CS, CS) == b"x" * CS
        assert img.read(0, 5000) == b"\x01" * 5000
        assert img.read(CS, 100) == b"\x55" * 100


def test_refcount_block_over_data_is_not_repaired_silently(image):
    """A refcount block placed on a data cluster: rebuilding refcounts would overwrite
    the data, so repair must not report success."""
    rt = layout(image)["reftable"]
    l1 = layout(image)["l1"]
    l2 = be64(image, l1) & 0x00FFFFFFFFFFFE00
    data = be64(image, l2) & 0x00FFFFFFFFFFFE00
    patch(image, rt + 16, struct.pack(">Q", data))
    try:
        with q.open(image, "r+") as img:
            result = img.check(repair=True)
    except fvd.CorruptImageError:
        return
    assert not result.ok


def test_huge_vm_state_size_is_refused(image):
    snaps = layout(image)["snapshots"]
    # extra data: vm_state_size_large (u64) follows the 40-byte fixed record
    patch(image, snaps + 40, struct.pack(">Q", (1 << 63) + 5))
    with pytest.raises(fvd.CorruptImageError):
        with q.open(image) as img:
            img.read_vm_state("s")
