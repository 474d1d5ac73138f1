"""Bad input: every damaged image gives a clear FvdError naming file and offset."""

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fvd
from fvd.ondisk import format as fmt
from fvd.units import MiB


def make_image(path, cache="writeback", crash=False):
    fvd.create(path, 16 * MiB, chunk_size=64 * 1024, journal_size=64 * 1024, overwrite=True)
    img = fvd.open(path, "r+", cache=cache)
    for i in range(8):
        img.write(i * 1024 * 1024 + 100, bytes([i + 1]) * 70000)
    img.flush()
    header = img._core.header
    if crash:
        img._crash()
    else:
        img.close()
        header = fvd.open(path)._core.header
    return header


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def expect_corrupt(path, offset=None):
    with pytest.raises(fvd.CorruptImageError) as info:
        with fvd.open(path) as img:
            img.read(0, img.size)
    assert str(path) in str(info.value)
    if offset is not None:
        assert info.value.offset == offset
    return info.value


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "bad.fvd")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_build_header_matches_construct(data):
    """build_header packs with struct; the bytes are construct's Header.build of the same
    fields (missing ones 0, magic / version / size fixed) with the checksum set."""
    fields = {}
    for sc in fmt.Header.subcons:
        if sc.name and data.draw(st.booleans()):
            if sc.name == "image_uuid":  # the one bytes field (missing: zeros)
                fields[sc.name] = data.draw(st.binary(min_size=16, max_size=16))
                continue
            bits = 8 * sc.sizeof()
            fields[sc.name] = data.draw(st.integers(0, (1 << bits) - 1))
    raw = fmt.build_header(fmt.ImageHeader(**fields))
    values = {sc.name: fields.get(sc.name, 0) for sc in fmt.Header.subcons if sc.name}
    values.setdefault("image_uuid", fields.get("image_uuid", bytes(16)))
    if values["image_uuid"] == 0:
        values["image_uuid"] = bytes(16)
    values.update(version=fmt.VERSION, header_size=fmt.HEADER_SIZE, header_crc=0)
    del values["magic"]
    expect = bytearray(fmt.Header.build(values))
    expect[fmt.CRC_FIELD] = fmt.header_crc(expect).to_bytes(4, "little")
    assert raw == bytes(expect)
    assert fmt.header_crc(raw) == int.from_bytes(raw[fmt.CRC_FIELD], "little")


def test_random_bytes(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(64 * 1024))
    expect_corrupt(path, 0)


def test_empty_and_truncated_header(path):
    open(path, "wb").close()
    expect_corrupt(path, 0)
    make_image(path)
    os.truncate(path, 100)
    expect_corrupt(path, 0)


def test_zeroed_header(path):
    make_image(path)
    patch(path, 0, bytes(4096))
    expect_corrupt(path, 0)


def test_header_bit_flip_is_caught_by_checksum(path):
    make_image(path)
    with open(path, "r+b") as f:
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0x10]))
    err = expect_corrupt(path, 12)
    assert "checksum" in str(err)


def rewrite_header(path, **changes):
    raw = open(path, "rb").read(fmt.HEADER_SIZE)
    h = fmt.ImageHeader.from_bytes(raw).replace(**changes)
    patch(path, 0, fmt.build_header(h))


@pytest.mark.parametrize(
    "changes",
    [
        dict(chunk_size=3 * MiB),
        dict(chunk_size=0),
        dict(block_size=1 << 30),
        dict(virtual_size=0),
        dict(virtual_size=1 << 62),
        dict(table_size=4),
        dict(journal_offset=10),
        dict(data_offset=1 << 50),
        dict(table_offset=1 << 40),
        dict(journal_size=100),
        dict(base_format=9),
    ],
)
def test_header_fields_out_of_range(path, changes):
    make_image(path)
    rewrite_header(path, **changes)
    expect_corrupt(path)


def test_unknown_incompatible_feature_refuses(path):
    make_image(path)
    rewrite_header(path, incompatible_features=1 << 40)
    with pytest.raises(fvd.UnsupportedFeatureError):
        fvd.open(path)


def test_unknown_version_refuses(path):
    make_image(path)
    raw = bytearray(open(path, "rb").read(fmt.HEADER_SIZE))
    raw[4:8] = struct.pack("<I", 99)
    raw[12:16] = fmt.header_crc(raw).to_bytes(4, "little")
    patch(path, 0, raw)
    with pytest.raises(fvd.UnsupportedFeatureError):
        fvd.open(path)


def test_table_bit_flip_is_caught(path):
    h = make_image(path)
    with open(path, "r+b") as f:
        f.seek(h.table_offset + 4 * 16)
        f.write(struct.pack("<I", 0x00100000))  # points far past the end of the file
    expect_corrupt(path)


def test_table_entry_past_end_after_crash_names_the_entry(path):
    h = make_image(path)
    table = np.fromfile(path, dtype="<u4", count=256, offset=h.table_offset)
    table[5] = 0x0000FFFF
    raw = table.tobytes()
    patch(path, h.table_offset, raw)
    rewrite_header(path, table_crc=__import__("zlib").crc32(raw))
    err = expect_corrupt(path, h.table_offset + 4 * 5)
    assert "past the end" in str(err)


def test_two_chunks_sharing_a_physical_chunk(path):
    h = make_image(path)
    table = np.fromfile(path, dtype="<u4", count=256, offset=h.table_offset)
    table[17] = table[16]
    raw = table.tobytes()
    patch(path, h.table_offset, raw)
    rewrite_header(path, table_crc=__import__("zlib").crc32(raw))
    expect_corrupt(path)
    from fvd.image import check_file as check_path

    result = check_path(path)
    assert result.corruptions >= 1 and not result.ok


def test_journal_bit_flip_is_caught(path):
    h = make_image(path, crash=True)
    with open(path, "r+b") as f:
        f.seek(h.journal_offset + 40)
        b = f.read(1)
        f.seek(h.journal_offset + 40)
        f.write(bytes([b[0] ^ 1]))
    err = expect_corrupt(path, h.journal_offset)
    assert "journal" in str(err)


def test_journal_record_out_of_range(path):
    h = make_image(path, crash=True)
    from fvd.core.journal import _table_record, pack_transaction

    bad = pack_transaction([_table_record(10_000, [1])], h.journal_epoch, 0)
    patch(path, h.journal_offset, bad)
    err = expect_corrupt(path)
    assert "out of range" in str(err)


def test_truncated_data_area(path):
    h = make_image(path)
    os.truncate(path, h.data_offset + 1000)
    expect_corrupt(path)


def test_cli_reports_one_line(path, capsys):
    from fvd.cli import main

    with open(path, "wb") as f:
        f.write(b"garbage" * 100)
    assert main(["info", "-f", "fvd", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and "Traceback" not in err
    assert main(["info", path]) == 0  # probed: no magic, so raw (as qemu-img)
    assert "file format: raw" in capsys.readouterr().out
    assert main(["check", path]) == 1  # not an image: the check cannot run


@settings(
    max_examples=int(os.environ.get("FVD_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_fuzz_open_path(tmp_path_factory, data):
    """Corrupt random bytes of the metadata: open either fails cleanly or reads sanely."""
    path = str(tmp_path_factory.mktemp("fuzz") / "f.fvd")
    crash = data.draw(st.booleans())
    h = make_image(path, crash=crash)
    size = os.path.getsize(path)
    limit = min(size, h.data_offset)
    hot = [0, h.table_offset, h.journal_offset]
    edits = data.draw(
        st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from(hot).flatmap(lambda b: st.integers(b, b + 600)),
                    st.integers(0, limit - 1),
                ),
                st.binary(min_size=1, max_size=8),
            ),
            min_size=1,
            max_size=6,
        )
    )
    for off, blob in edits:
        patch(path, min(off, limit - len(blob)), blob)
    if data.draw(st.booleans()):
        rewrite_checksum(path)
    try:
        with fvd.open(path) as img:
            got = img.read(0, img.size)
            assert len(got) == img.size
            list(img.extents())
            img.check()
    except fvd.FvdError as e:
        assert path in str(e)


def rewrite_checksum(path):
    raw = bytearray(open(path, "rb").read(fmt.HEADER_SIZE))
    if len(raw) == fmt.HEADER_SIZE:
        raw[12:16] = fmt.header_crc(raw).to_bytes(4, "little")
        patch(path, 0, raw)
