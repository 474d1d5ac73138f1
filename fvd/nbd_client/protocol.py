"""NBD protocol numbers (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
and the bounds this client holds every peer-supplied length to."""

from __future__ import annotations

from fvd.units import KiB, MiB

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_STARTTLS, OPT_GO = 1, 2, 5, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1
REP_ERR_TLS_REQD = REP_ERROR_BIT | 5
REP_ERRORS = {
    REP_ERROR_BIT | 1: "unsupported",
    REP_ERROR_BIT | 2: "refused by policy",
    REP_ERROR_BIT | 3: "invalid",
    REP_ERROR_BIT | 4: "unsupported on the platform",
    REP_ERROR_BIT | 5: "TLS required",
    REP_ERROR_BIT | 6: "unknown export",
    REP_ERROR_BIT | 7: "server shutting down",
    REP_ERROR_BIT | 8: "block size required",
    REP_ERROR_BIT | 9: "too big",
}
INFO_EXPORT = 0

CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
REPLY_FLAG_DONE = 1
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR_BIT = 1 << 15
REPLY_ERROR, REPLY_ERROR_OFFSET = REPLY_ERROR_BIT | 1, REPLY_ERROR_BIT | 2
STATE_HOLE, STATE_ZERO = 1, 2
STATE_MASK = STATE_HOLE | STATE_ZERO  # the base:allocation bits fvd uses; others ignored
BASE_ALLOCATION = b"base:allocation"

# ----- bounds --------------------------------------------------------------------------
# Strings (export names, error messages, context names) are at most 4096 bytes (proto.md,
# "Conventions"); the largest option reply made of defined fields is NBD_REP_SERVER (two
# strings and a length, about 8 KiB). 64 KiB leaves room for reply types added later and
# bounds what one option reply can make us allocate.
MAX_STRING = 4096
MAX_OPTION_REPLY = 64 * KiB
MAX_OPTION_REPLIES = 256  # replies to one option (NBD_REP_INFO...): more is a hostile server
MAX_EXPORT_SIZE = (1 << 63) - 1  # offsets are signed 64-bit for the OS and for fvd
MAX_REQUEST = 4 * MiB  # read request size: below every server's limit (qemu-nbd: 32 MiB)
MAX_STATUS = 1 << 30  # block status request length
MAX_STATUS_RUNS = 1 << 16  # merged runs taken from one block status reply; the rest is skipped
STATUS_PIECE = 64 * KiB  # descriptors are read and merged 8 Ki at a time
SPARSE_READ_MIN = 1 * MiB  # reads this large ask block status first

# ----- deadlines -----------------------------------------------------------------------
DEFAULT_PORT = 10809
DEFAULT_CONNECT_TIMEOUT = 30.0  # connect + TLS + handshake, seconds
DEFAULT_TIMEOUT = 30.0  # per request, plus MIN_RATE's allowance for its payload
MIN_RATE = 64 * KiB  # bytes/s: each payload byte received adds 1/MIN_RATE s to the deadline
MAX_CREDIT = MAX_REQUEST  # ... for at most this many bytes: a request ends within timeout + 64 s
MAX_TIMEOUT = 24 * 3600.0
