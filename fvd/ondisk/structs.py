"""Layouts derived from the construct declarations, so each record is declared once.

`construct` parses and builds a whole record with names, which is right at open and
checkpoint but slow per I/O. `struct_of` turns a declaration made of fixed-size fields
into the equivalent `struct.Struct` (same bytes, values in declaration order, padding
skipped), `offset_of` / `offsets` give byte offsets of fields (for in-place updates and
error messages), `bit_mask` the mask of a field of a 64-bit entry declared as a
BitStruct, and `dtype_of` the numpy dtype of an array element.
"""

from __future__ import annotations

import dataclasses
import struct
from functools import lru_cache
from typing import Any, get_type_hints

from construct import (
    Bytes,
    Const,
    FormatField,
    Padded,
    Padding,
    Pass,
    Renamed,
    SizeofError,
    Struct,
    Transformed,
)

__all__ = [
    "array_struct",
    "record_fields",
    "record_struct",
    "bit_mask",
    "dtype_of",
    "field_names",
    "offset_of",
    "offsets",
    "span_struct",
    "struct_of",
]

# struct format codes of construct's integer fields -> numpy kind + size
_NUMPY = {"B": "u1", "b": "i1", "H": "u2", "h": "i2", "L": "u4", "I": "u4", "l": "i4"}
_NUMPY.update({"i": "i4", "Q": "u8", "q": "i8"})


def _parts(con: Any) -> list[tuple[str | None, str, str]]:
    """(name or None, byte order, struct code) of each field of a fixed-size record."""
    if isinstance(con, FormatField):
        return [(None, con.fmtstr[0], con.fmtstr[1:])]
    if not isinstance(con, Struct):
        raise TypeError(f"{con!r} is not a Struct of fixed-size fields")
    out: list[tuple[str | None, str, str]] = []
    for sc in con.subcons:
        name = sc.name if isinstance(sc, Renamed) else None
        inner = sc.subcon if isinstance(sc, Renamed) else sc
        if isinstance(inner, Const):
            inner = inner.subcon
        if isinstance(inner, FormatField):
            out.append((name, inner.fmtstr[0], inner.fmtstr[1:]))
        elif isinstance(inner, Padded) and inner.subcon is Pass:  # Padding(n)
            if not isinstance(inner.length, int):
                raise TypeError(f"padding of variable length in {con!r}")
            out.append((None, "", f"{inner.length}x"))
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            out.append((name, "", f"{inner.length}s"))
        else:
            raise TypeError(f"field {name!r} of {con!r} is not a fixed-size integer or bytes")
    return out


def _order(parts: list[tuple[str | None, str, str]]) -> str:
    orders = {o for _, o, _ in parts if o}
    if len(orders) > 1:
        raise TypeError("a record mixes byte orders")
    return orders.pop() if orders else "<"


def record_fields(cls: type) -> tuple[str, ...]:
    """Field names of the dataclass `cls`, in declaration (on-disk) order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def record_struct(cls: type, size: int) -> Struct:
    """The construct record of a dataclass whose fields are annotated
    ``Annotated[type, construct field]``, zero-padded to `size` bytes: one declaration
    gives both the typed record and its layout."""
    hints = get_type_hints(cls, include_extras=True)
    subcons = [name / hints[name].__metadata__[0] for name in record_fields(cls)]
    used = Struct(*subcons).sizeof()
    if used > size:
        raise TypeError(f"{cls.__name__} needs {used} bytes, more than {size}")
    return Struct(*subcons, Padding(size - used)) if used < size else Struct(*subcons)


def struct_of(con: Any) -> struct.Struct:
    """The struct.Struct packing the same bytes as `con`: its values are the named (and
    unnamed non-padding) fields in declaration order; padding packs zeros."""
    parts = _parts(con)
    st = struct.Struct(_order(parts) + "".join(code for _, _, code in parts))
    assert st.size == con.sizeof(), con
    return st


@lru_cache(maxsize=1024)
def array_struct(field: Any, count: int) -> struct.Struct:
    """The struct.Struct of `count` consecutive `field` values (a run of table entries)."""
    one = struct_of(field).format
    return struct.Struct(f"{one[0]}{count}{one[1:]}")


def field_names(con: Any) -> list[str]:
    """Names of the values `struct_of(con)` packs / unpacks, in order."""
    return [name or "" for name, _, code in _parts(con) if not code.endswith("x")]


def offsets(con: Struct) -> dict[str, int]:
    """Byte offset of every named field up to the first field of variable size."""
    out, pos = {}, 0
    for sc in con.subcons:
        if sc.name:
            out[sc.name] = pos
        try:
            pos += sc.sizeof()
        except SizeofError:  # a variable-size field: later offsets are not fixed
            break
    return out


def offset_of(con: Struct, name: str) -> int:
    """Byte offset of field `name` in the record `con`."""
    try:
        return offsets(con)[name]
    except KeyError:
        raise KeyError(f"no fixed-offset field {name!r} in the record") from None


def span_struct(con: Struct, first: str, last: str) -> tuple[int, struct.Struct]:
    """(offset, struct) of the consecutive fields first..last: the few bytes an in-place
    update of those fields writes (as QEMU updates l1_size + l1_table_offset)."""
    names = [sc.name for sc in con.subcons]
    i, j = names.index(first), names.index(last)
    if j < i:
        raise ValueError(f"{last!r} comes before {first!r}")
    return offset_of(con, first), struct_of(Struct(*con.subcons[i : j + 1]))


def bit_mask(entry: Any, name: str) -> int:
    """Mask, in the entry's integer value, of field `name` of a BitStruct declaration
    (fields listed from the most significant bit down, as construct builds them)."""
    inner = entry.subcon if isinstance(entry, Transformed) else entry
    total = entry.sizeof() * 8
    pos = 0
    for sc in inner.subcons:
        width = sc.sizeof()  # in bits, inside a BitStruct
        if sc.name == name:
            return int(((1 << width) - 1) << (total - pos - width))
        pos += width
    raise KeyError(f"no bit field {name!r}")


def dtype_of(field: Any) -> str:
    """numpy dtype string ('<u4', '>u8' ...) of an integer field or of a BitStruct entry
    (an array element). A BitStruct is stored most significant byte first: big-endian."""
    if isinstance(field, Transformed):
        return f">u{field.sizeof()}"
    if not isinstance(field, FormatField):
        raise TypeError(f"{field!r} is not an integer field")
    return str(field.fmtstr[0]) + _NUMPY[field.fmtstr[1:]]
