"""The metadata journal: table and bitmap updates as small self-checking records.

A journal write is one or more 512-byte sectors appended at the next free position.
Each sector carries the journal epoch (from the header), its own sequence number and a
crc32, so a sector left over from an earlier epoch, or never written, ends the replay.
Records of one transaction (one guest write) are applied together or not at all.
Sector and record layouts are in docs/format.md ("Journal") and declared in
fvd.ondisk.fvd_records; the struct twins derived there pack them here.
"""

import os
import zlib
from typing import Any, Iterable, Iterator, Optional

from fvd.errors import CorruptImageError
from fvd.fileio import full_pwrite
from fvd.ondisk import fvd_records as fr
from fvd.ondisk.fvd_records import REC_BITMAP, REC_DATA_CRC, REC_GRANULE, REC_TABLE, SECTOR
from fvd.ondisk.structs import array_struct, span_struct

SECTOR_MAGIC = fr.JOURNAL_MAGIC
SECTOR_HEAD = fr.S_JOURNAL_SECTOR_HEAD  # magic crc epoch seq tx_remaining nrecords reserved
RECORD_HEAD = fr.S_JOURNAL_RECORD_HEAD  # type count start
GRANULE_PAYLOAD = fr.S_GRANULE  # front_chunk source_chunk
DATA_CRC_PAYLOAD = fr.S_DATA_CRC  # crc
_OFF_CRC, _S_CRC = span_struct(fr.JournalSectorHead, "crc", "crc")
PAYLOAD = SECTOR - SECTOR_HEAD.size
TABLE_ENTRIES_PER_SECTOR = (PAYLOAD - RECORD_HEAD.size) // fr.S_TABLE_ENTRY.size


def table_records(changes: dict[int, int]) -> list[bytes]:
    """Records setting table entries; `changes` maps virtual chunk -> new entry."""
    out = []
    run_start = 0  # set by the first entry of each run
    run: list[int] = []
    for v in sorted(changes):
        if run and (v != run_start + len(run) or len(run) == TABLE_ENTRIES_PER_SECTOR):
            out.append(_table_record(run_start, run))
            run = []
        if not run:
            run_start = v
        run.append(changes[v])
    if run:
        out.append(_table_record(run_start, run))
    return out


def _table_record(first: int, entries: list[int]) -> bytes:
    return RECORD_HEAD.pack(REC_TABLE, len(entries), first) + array_struct(
        fr.TableEntry, len(entries)
    ).pack(*entries)


def bitmap_record(first_block: int, count: int) -> bytes:
    """Record setting `count` bitmap bits from `first_block` (blocks now in the image)."""
    return RECORD_HEAD.pack(REC_BITMAP, count, first_block)


def data_crc_record(host_offset: int, length: int, crc: int) -> bytes:
    """Record naming data the transaction depends on: replay drops the transaction if the
    bytes at host_offset do not have this crc32 (the data write did not reach the disk)."""
    return RECORD_HEAD.pack(REC_DATA_CRC, length, host_offset) + DATA_CRC_PAYLOAD.pack(crc)


def granule_record(first_granule: int, count: int, chunk: int, source: int) -> bytes:
    """Record setting `count` granule bits from global granule `first_granule` (all in
    one virtual chunk) of partial chunk `chunk`, whose unset granules read `source`."""
    return RECORD_HEAD.pack(REC_GRANULE, count, first_granule) + GRANULE_PAYLOAD.pack(chunk, source)


def pack_transaction(records: Iterable[bytes], epoch: int, first_seq: int) -> bytes:
    """Pack records into sectors; the sectors of one transaction count down to 0."""
    groups: list[list[bytes]] = []
    cur: list[bytes] = []
    used = 0
    for rec in records:
        if used + len(rec) > PAYLOAD:
            groups.append(cur)
            cur, used = [], 0
        cur.append(rec)
        used += len(rec)
    groups.append(cur)
    out = bytearray()
    for i, group in enumerate(groups):
        body = b"".join(group)
        sector = bytearray(
            SECTOR_HEAD.pack(
                SECTOR_MAGIC, 0, epoch, first_seq + i, len(groups) - 1 - i, len(group), 0
            )
            + body
        )
        sector.extend(bytes(SECTOR - len(sector)))
        _S_CRC.pack_into(sector, _OFF_CRC, zlib.crc32(sector))
        out += sector
    return bytes(out)


class Journal:
    """Appends transactions to the journal region; the owner checkpoints when full."""

    def __init__(self, fd: int, offset: int, size: int, epoch: int, stats: Any) -> None:
        self.fd, self.offset, self.size = fd, offset, size
        self.epoch = epoch
        self.stats = stats
        self.next_seq = 0

    def fits(self, nbytes: int) -> bool:
        return (self.next_seq * SECTOR + nbytes) <= self.size

    def append(self, records: list[bytes]) -> bool:
        """Write the records as one transaction (one write); False if it does not fit."""
        data = pack_transaction(records, self.epoch, self.next_seq)
        if not self.fits(len(data)):
            return False
        full_pwrite(self.fd, data, self.offset + self.next_seq * SECTOR)
        self.next_seq += len(data) // SECTOR
        self.stats.metadata_writes += 1
        self.stats.metadata_bytes_written += len(data)
        self.stats.journal_records += len(records)
        return True

    def restart(self, epoch: int) -> None:
        self.epoch = epoch
        self.next_seq = 0


def read_transactions(
    fd: int, path: str, offset: int, size: int, epoch: int
) -> Iterator[list[tuple[int, int, int, Any]]]:
    """Yield the committed transactions (lists of (type, count, start, payload)) in order."""
    pending = []
    seq = 0
    chunk = 256 * SECTOR
    while seq * SECTOR < size:
        raw = os.pread(fd, min(chunk, size - seq * SECTOR), offset + seq * SECTOR)
        for pos in range(0, len(raw) - SECTOR + 1, SECTOR):
            sector = raw[pos : pos + SECTOR]
            head = _valid_sector(sector, epoch, seq, path, offset + seq * SECTOR)
            if head is None:
                return
            pending.extend(_records(sector, head[5], path, offset + seq * SECTOR))
            if head[4] == 0:
                yield pending
                pending = []
            seq += 1
        if len(raw) < SECTOR:
            return


def range_crc(fd: int, offset: int, length: int, piece: int = 1 << 20) -> Optional[int]:
    """crc32 of `length` bytes at `offset`, read in bounded pieces; None when the file
    ends first (the bytes never reached the disk)."""
    crc = 0
    done = 0
    while done < length:
        data = os.pread(fd, min(piece, length - done), offset + done)
        if not data:
            return None
        crc = zlib.crc32(data, crc)
        done += len(data)
    return crc


def _valid_sector(
    sector: bytes, epoch: int, seq: int, path: str, where: int
) -> Optional[tuple[int, ...]]:
    if len(sector) < SECTOR:
        return None
    head = SECTOR_HEAD.unpack_from(sector)
    magic, crc, s_epoch, s_seq = head[:4]
    if magic != SECTOR_MAGIC or s_epoch != epoch or s_seq != seq:
        return None  # never written in this epoch: the end of the journal
    check = bytearray(sector)
    _S_CRC.pack_into(check, _OFF_CRC, 0)
    if zlib.crc32(check) != crc:
        # Sector writes are atomic, so a written sector with a bad crc is damage, not a crash.
        raise CorruptImageError(path, where, "journal sector checksum mismatch")
    return head


def _records(sector: bytes, nrec: int, path: str, where: int) -> list[tuple[int, int, int, Any]]:
    pos = SECTOR_HEAD.size
    out: list[tuple[int, int, int, Any]] = []
    for _ in range(nrec):
        if pos + RECORD_HEAD.size > SECTOR:
            raise CorruptImageError(path, where + pos, "journal record overruns its sector")
        rtype, count, start = RECORD_HEAD.unpack_from(sector, pos)
        pos += RECORD_HEAD.size
        if rtype == REC_TABLE:
            end = pos + fr.S_TABLE_ENTRY.size * count
            if end > SECTOR:
                raise CorruptImageError(path, where + pos, "table record overruns its sector")
            out.append(
                (rtype, count, start, array_struct(fr.TableEntry, count).unpack_from(sector, pos))
            )
            pos = end
        elif rtype == REC_BITMAP:
            out.append((rtype, count, start, None))
        elif rtype == REC_DATA_CRC:
            if pos + DATA_CRC_PAYLOAD.size > SECTOR:
                raise CorruptImageError(path, where + pos, "data-crc record overruns its sector")
            out.append((rtype, count, start, DATA_CRC_PAYLOAD.unpack_from(sector, pos)[0]))
            pos += DATA_CRC_PAYLOAD.size
        elif rtype == REC_GRANULE:
            if pos + GRANULE_PAYLOAD.size > SECTOR:
                raise CorruptImageError(path, where + pos, "granule record overruns its sector")
            out.append((rtype, count, start, GRANULE_PAYLOAD.unpack_from(sector, pos)))
            pos += GRANULE_PAYLOAD.size
        else:
            raise CorruptImageError(
                path, where + pos - RECORD_HEAD.size, f"unknown journal record type {rtype}"
            )
    return out
