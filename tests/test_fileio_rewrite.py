"""fvd.fileio.open_for_rewrite: what convert, create and the qcow2 writer open their new
files with (an empty file is not truncated: ext4's auto_da_alloc would start writeback of
the whole output at close, the cost `-t unsafe` is meant to skip; docs/benchmarks.md)."""

import os

import pytest

from fvd.fileio import open_for_rewrite


def test_new_file_is_created_and_an_existing_one_refused_without_overwrite(tmp_path):
    path = str(tmp_path / "new.img")
    os.close(open_for_rewrite(path, overwrite=False))
    assert os.path.getsize(path) == 0
    with pytest.raises(FileExistsError):
        open_for_rewrite(path, overwrite=False)


def test_overwrite_empties_a_file_with_data_and_keeps_an_empty_one(tmp_path):
    path = str(tmp_path / "old.img")
    with open(path, "wb") as f:
        f.write(b"x" * 10000)
    fd = open_for_rewrite(path, overwrite=True)
    try:
        assert os.fstat(fd).st_size == 0
        os.pwrite(fd, b"new", 0)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"new"
    empty = str(tmp_path / "empty.img")
    open(empty, "wb").close()
    inode = os.stat(empty).st_ino
    os.close(open_for_rewrite(empty, overwrite=True))
    assert os.stat(empty).st_ino == inode and os.path.getsize(empty) == 0
