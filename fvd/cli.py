"""The `fvd` command line, modelled on qemu-img."""
import argparse
import json
import sys

from . import format as fmt
from .errors import FvdError

SUFFIXES = {"": 1, "B": 1, "K": fmt.KiB, "M": fmt.MiB, "G": fmt.GiB, "T": fmt.TiB,
            "P": fmt.TiB << 10}


class UsageError(Exception):
    pass


def parse_size(text):
    """qemu-img style sizes: 512, 64K, 1.5G, 2T (powers of 1024)."""
    t = text.strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    unit = t[-1:] if t[-1:] in SUFFIXES and not t[-1:].isdigit() else ""
    number = t[:-1] if unit else t
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise UsageError(f"invalid size {text!r} (use a number with an optional K, M, G or T)")
    size = int(value * SUFFIXES[unit])
    if size < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    return size


def parse_options(text):
    """-o key=value,key=value"""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"option {item!r} needs a value (key=value)")
        out[key.strip()] = value.strip()
    return out


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def emit(args, data, text):
    if getattr(args, "output", "human") == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# ----- commands ---------------------------------------------------------------
def cmd_create(args):
    from .image import create
    opts = parse_options(args.options)
    kwargs = {}
    for key in ("chunk_size", "block_size", "journal_size"):
        if key in opts:
            kwargs[key] = parse_size(opts.pop(key))
    if opts:
        raise UsageError(f"unknown option(s): {', '.join(opts)}")
    if args.backing:
        kwargs["base"] = args.backing
        kwargs["base_format"] = args.backing_format
    size = parse_size(args.size) if args.size else None
    if size is None:
        if not args.backing:
            raise UsageError("an image size is required without a base image")
        size = _base_size(args.backing, args.backing_format)
    create(args.image, size, overwrite=args.force, **kwargs)
    print(f"Formatting '{args.image}', fmt=fvd size={size}"
          + (f" backing_file={args.backing}" if args.backing else ""))
    return 0


def _base_size(path, base_format):
    import os
    from .nbd_client import is_nbd_uri
    if is_nbd_uri(path):
        from .nbd_client import NbdClient
        client = NbdClient(path, max_connections=1)
        client.close()
        return client.size
    if base_format == "fvd":
        from .image import open as open_image
        with open_image(path) as b:
            return b.size
    if base_format == "qcow2":
        from . import qcow2
        with qcow2.open(path) as b:
            return b.size
    return os.stat(path).st_size


def cmd_info(args):
    from .image import open as open_image
    with open_image(args.image, force_share=args.force_share) as img:
        info = img.info()
    lines = [f"image: {info['filename']}", "file format: fvd",
             f"virtual size: {human(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {human(info['actual-size'])}",
             f"chunk size: {info['chunk-size']}", f"block size: {info['block-size']}",
             f"allocated chunks: {info['allocated-chunks']}",
             f"clean shutdown: {'yes' if info['clean-shutdown'] else 'no'}"]
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']}")
        lines.append(f"backing file format: {info['backing-filename-format']}")
        lines.append(f"base prefetched: {'yes' if info['base-prefetched'] else 'no'}")
        for depth, layer in enumerate(info.get("backing-chain", []), 1):
            lines.append(f"  chain[{depth}]: {layer}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(_snapshot_table(info["snapshots"]))
    emit(args, info, "\n".join(lines))
    return 0


def cmd_check(args):
    from .check import check_path
    try:
        result = check_path(args.image, repair=args.repair is not None)
    except FvdError as e:
        if getattr(args, "output", "human") == "json":
            print(json.dumps({"filename": args.image, "corruptions": 1, "leaks": 0,
                              "ok": False, "messages": [str(e)]}, indent=2))
        else:
            print(f"ERROR: {e}")
        return 2
    data = dict(result.as_dict(), filename=args.image)
    lines = list(result.messages or [])
    if result.ok:
        lines.append("No errors were found on the image.")
    else:
        lines.append(f"{result.corruptions} errors were found on the image."
                     if result.corruptions else
                     f"{result.leaks} leaked chunks were found on the image.")
    if result.leaks_fixed:
        lines.append(f"{result.leaks_fixed} leaked chunks were repaired.")
    emit(args, data, "\n".join(lines))
    return 2 if result.corruptions else 3 if result.leaks else 0


def cmd_map(args):
    from .image import open as open_image
    with open_image(args.image, force_share=args.force_share) as img:
        extents = [e.as_dict() for e in img.extents()]
    if args.output == "json":
        print(json.dumps(extents, indent=None).replace("}, {", "},\n{"))
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in extents:
        if e["data"]:
            print(f"{e['start']:#<20x}{e['length']:#<20x}{e.get('offset', 0):#<20x}"
                  f"{args.image}".replace("#", " "))
    return 0


def _snapshot_table(snaps):
    rows = [f"{'ID':<6}{'TAG':<24}{'VM SIZE':>12}  {'DATE':<20}"]
    for s in snaps:
        created = s.get("created")
        created = created.strftime("%Y-%m-%d %H:%M:%S") if hasattr(created, "strftime") \
            else str(created)[:19].replace("T", " ")
        rows.append(f"{s['id']:<6}{s['name']:<24}{human(s['vm_state_size']):>12}  {created:<20}")
    return "\n".join(rows)


def cmd_snapshot(args):
    from .image import open as open_image
    if args.list:
        with open_image(args.image, force_share=args.force_share) as img:
            snaps = [s.as_dict() for s in img.snapshots()]
        emit(args, snaps, _snapshot_table(snaps))
        return 0
    with open_image(args.image, "r+") as img:
        if args.create:
            img.create_snapshot(args.create)
        elif args.delete:
            img.delete_snapshot(args.delete)
        elif args.apply:
            img.revert_to_snapshot(args.apply)
    return 0


def cmd_prefetch(args):
    from .image import open as open_image
    progress = None
    if args.progress:
        from .base import progress_bar
        progress = progress_bar(sys.stderr)
    with open_image(args.image, "r+") as img:
        img.prefetch(progress)
    if args.progress:
        sys.stderr.write("\n")
    return 0


def cmd_serve(args):
    from .serve import serve
    if (args.socket is None) == (args.port is None):
        raise UsageError("give exactly one of --socket PATH or --port N")
    return serve(args.image, snapshot=args.snapshot, readonly=args.readonly,
                 socket=args.socket, port=args.port, bind=args.bind, shared=args.shared,
                 image_format=args.fmt or _probe(args.image), force_share=args.force_share)


def _probe(path):
    from .base import detect_format
    return detect_format(path)


def cmd_bench(args):
    from . import bench
    return bench.run(args)


# ----- parser -----------------------------------------------------------------
def _force_share_option(parser):
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open even while another handle writes it (best-effort view)")


def build_parser():
    p = argparse.ArgumentParser(prog="fvd", description="Create, inspect and benchmark FVD "
                                "copy-on-write disk images.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("create", help="create a new image")
    c.add_argument("-b", dest="backing", metavar="BASE", help="base (backing) image")
    c.add_argument("-F", dest="backing_format", choices=sorted(fmt.BASE_FORMATS),
                   help="base image format")
    c.add_argument("-o", dest="options", metavar="OPTS",
                   help="chunk_size=SIZE,block_size=SIZE,journal_size=SIZE")
    c.add_argument("-f", dest="fmt", default="fvd", choices=["fvd"], help="image format")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c.add_argument("image")
    c.add_argument("size", nargs="?", help="virtual size, e.g. 10G (default: base size)")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("info", help="show header facts, allocation and snapshots")
    i.add_argument("--output", choices=["human", "json"], default="human")
    _force_share_option(i)
    i.add_argument("image")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("check", help="check consistency (exit 0 clean, 2 corrupt, 3 leaks)")
    k.add_argument("-r", dest="repair", choices=["leaks", "all"], help="repair")
    k.add_argument("--output", choices=["human", "json"], default="human")
    k.add_argument("image")
    k.set_defaults(func=cmd_check)

    m = sub.add_parser("map", help="show the allocation map (as qemu-img map)")
    m.add_argument("--output", choices=["human", "json"], default="human")
    _force_share_option(m)
    m.add_argument("image")
    m.set_defaults(func=cmd_map)

    s = sub.add_parser("snapshot", help="list, create, delete or apply internal snapshots")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("-l", dest="list", action="store_true", help="list snapshots")
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    g.add_argument("-a", dest="apply", metavar="NAME", help="revert to a snapshot")
    s.add_argument("--output", choices=["human", "json"], default="human")
    _force_share_option(s)
    s.add_argument("image")
    s.set_defaults(func=cmd_snapshot)

    f = sub.add_parser("prefetch", help="copy the base image into the image")
    f.add_argument("-p", dest="progress", action="store_true", help="show progress")
    f.add_argument("image")
    f.set_defaults(func=cmd_prefetch)

    v = sub.add_parser("serve", help="export the image over NBD (nbdkit), in the foreground")
    v.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help="serve a snapshot "
                   "(read-only)")
    v.add_argument("-r", "--read-only", dest="readonly", action="store_true",
                   help="read-only export")
    v.add_argument("--socket", metavar="PATH", help="listen on a unix socket")
    v.add_argument("--port", type=int, metavar="N", help="listen on a TCP port")
    v.add_argument("--bind", metavar="ADDR", help="TCP address to listen on (default all)")
    v.add_argument("--shared", type=int, metavar="N", help="at most N clients at once")
    v.add_argument("-f", dest="fmt", choices=["fvd", "qcow2", "raw"], help="image format")
    _force_share_option(v)
    v.add_argument("image")
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="FVD against the QCOW2 baseline, raw and QEMU")
    try:
        from . import bench
        bench.add_arguments(b)
    except ImportError:
        pass
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"fvd {args.command}: {e}", file=sys.stderr)
        return 1
    except (FvdError, OSError, ValueError, KeyError) as e:
        name = getattr(args, "image", None)
        msg = str(e)
        if isinstance(e, OSError) and not isinstance(e, FvdError):
            msg = f"{e.filename or name}: {e.strerror or e}"
        elif isinstance(e, KeyError) and not isinstance(e, FvdError):
            msg = f"{name}: {e.args[0] if e.args else e}"
        print(f"fvd {args.command}: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fvd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
