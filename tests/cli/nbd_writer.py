"""A logging NBD writer for the live backup tests, run by the system Python (libnbd's
binding, python3-libnbd, exists only there):

    /usr/bin/python3 nbd_writer.py URI LOG WRITER FIRST_SLOT SLOTS SLOT_SIZE COUNT SEED

Writes COUNT times to a random slot of its own (FIRST_SLOT .. FIRST_SLOT+SLOTS-1), each
time the slot's next version: SLOT_SIZE bytes of 16-byte records (writer, slot, version).
Every 8th write asks for FUA, every 50th is followed by a flush. LOG gets one line per
acknowledged request, with CLOCK_MONOTONIC times (shared by every process):

    W slot version fua t_send t_ack     an acknowledged write
    U slot version fua t_send           a write sent but never acknowledged (server gone)
    F t_send t_ack                      an acknowledged flush

Prints "ready" once connected. Exits 0 when the server goes away (the crash test kills it).
"""

import random
import struct
import sys
import time

import nbd

RECORD = struct.Struct("<IIQ")


def main():
    uri, log_path, writer, first, slots, slot_size, count, seed = sys.argv[1:9]
    writer, first, slots = int(writer), int(first), int(slots)
    slot_size, count = int(slot_size), int(count)
    rng = random.Random(int(seed))
    h = nbd.NBD()
    h.connect_uri(uri)
    print("ready", flush=True)
    versions = {}
    with open(log_path, "w") as log:
        try:
            for i in range(count):
                slot = first + rng.randrange(slots)
                version = versions.get(slot, 0) + 1
                versions[slot] = version
                data = RECORD.pack(writer, slot, version) * (slot_size // RECORD.size)
                fua = i % 8 == 7
                t_send = time.monotonic()
                try:
                    h.pwrite(data, slot * slot_size, nbd.CMD_FLAG_FUA if fua else 0)
                except nbd.Error:
                    log.write(f"U {slot} {version} {int(fua)} {t_send!r}\n")
                    return
                log.write(f"W {slot} {version} {int(fua)} {t_send!r} {time.monotonic()!r}\n")
                if i % 50 == 49:
                    t_send = time.monotonic()
                    h.flush()
                    log.write(f"F {t_send!r} {time.monotonic()!r}\n")
        except nbd.Error:
            return
        finally:
            log.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
