"""The `fvd` command line, modelled on qemu-img."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import select
import signal
import sys
from collections.abc import Mapping
from typing import Any, Callable, NoReturn, Optional

from fvd import chain, cliutil, qcow2, units
from fvd.bench import runner as bench
from fvd.cliutil import (
    chain_infos,
    changed_dicts,
    human,
    info_text,
    open_args,
    progress_done,
    qemu_progress,
)
from fvd.control import find_server
from fvd.convert import convert, convert_served, dst_options
from fvd.errors import FvdError, ImageLockedError
from fvd.fileio import BACKING_POLICIES, BackingPolicy, resolve_relative
from fvd.image import Image, create
from fvd.image import open as open_image
from fvd.imageio import FORMATS, AnyImage, RawImage, resolve_format
from fvd.imageio import open_image as open_any
from fvd.nbd_client import NbdClient, is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.ops.checksum import checksum
from fvd.ops.info import snapshot_dict
from fvd.serve import serve
from fvd.types import ConvertResult


class UsageError(Exception):
    pass


def parse_size(text: str) -> int:
    """qemu-img style sizes (fvd.units.parse_size); a bad one is a usage error."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_options(text: Optional[str]) -> dict[str, str]:
    """-o key=value,key=value"""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"option {item!r} needs a value (key=value)")
        out[key.strip()] = value.strip()
    return out


def emit(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "output", "human") == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# ----- commands ---------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    if args.backing and not args.backing_format:
        raise UsageError(
            "-b BASE needs -F FMT (the base's format, raw, fvd or qcow2): a probed base "
            "may not be what it seems (as qemu-img since 6.1)"
        )
    if args.fmt != "fvd":
        return _create_other(args)

    opts = parse_options(args.options)
    kwargs: dict[str, Any] = {}
    for key in ("chunk_size", "block_size", "journal_size"):
        if key in opts:
            kwargs[key] = parse_size(opts.pop(key))
    if "table" in opts:  # table=off: a table-less image
        kwargs["table"] = dst_options("fvd", {"table": opts.pop("table")})["table"]
    if opts:
        raise UsageError(f"unknown option(s): {', '.join(opts)}")
    if args.backing:
        kwargs["base"] = args.backing
        kwargs["base_format"] = args.backing_format
    size = _new_size(args, "base image")
    create(args.image, size, overwrite=args.force, backing=args.backing_policy, **kwargs)
    return _formatted(args, size)


def _create_other(args: argparse.Namespace) -> int:
    """create -f qcow2 (fvd.qcow2: -o cluster_size=,lazy_refcounts=; -b/-F) or -f raw."""

    opts = dst_options(args.fmt, parse_options(args.options))
    size = _new_size(args, "backing file")
    if os.path.exists(args.image) and not args.force:
        raise FileExistsError(17, "file exists (--force replaces it)", args.image)
    if args.fmt == "raw":
        if args.backing:
            raise UsageError("a raw image cannot have a backing file")
        with open(args.image, "wb") as f:
            f.truncate(size)
    else:
        qcow2.create(
            args.image,
            -(-size // 512) * 512,
            overwrite=args.force,
            backing_file=args.backing,
            backing_format=args.backing_format,
            backing=args.backing_policy,
            **opts,
        )
    return _formatted(args, size)


def _new_size(args: argparse.Namespace, backing: str) -> int:
    """The size a new image gets: SIZE, or without it the size of the `backing` (-b)."""
    if args.size:
        return parse_size(args.size)
    if not args.backing:
        raise UsageError(f"an image size is required without a {backing}")
    return _base_size(args)


def _formatted(args: argparse.Namespace, size: int) -> int:
    """qemu-img create's line about the new image; exit status 0."""
    print(
        f"Formatting '{args.image}', fmt={args.fmt} size={size}"
        + (f" backing_file={args.backing}" if args.backing else "")
    )
    return 0


def _base_size(args: argparse.Namespace) -> int:
    """The size of the base `-b` names (relative to the new image's directory), opened
    as the backing policy allows."""
    path = resolve_relative(args.image, args.backing)
    policy = BackingPolicy.of(args.backing_policy, args.image)
    policy.admit(args.image, path)
    if is_nbd_uri(path):
        client = NbdClient(path, max_connections=1)
        client.close()
        return client.size
    with open_any(path, args.backing_format, backing=policy) as b:
        return b.size


def cmd_info(args: argparse.Namespace) -> int:

    try:
        infos = chain_infos(
            args.image, args.fmt, args.force_share, args.backing_chain, args.backing_policy
        )
    except ImageLockedError as e:
        infos = _served_infos(args, e)
    if args.output == "json":
        print(json.dumps(infos if args.backing_chain else infos[0], indent=4))
    else:
        print("\n\n".join(info_text(i, _snapshot_table) for i in infos))
    return 0


def _served_infos(args: argparse.Namespace, error: ImageLockedError) -> list[dict[str, Any]]:
    """info of an image held by fvd serve (through its control socket), and with
    --backing-chain the bases below, opened here (they are read-only)."""
    with cliutil.served(args.image, error, "info") as client:
        info = client.info()
    info["filename"] = args.image
    infos = [info]
    if args.backing_chain and "full-backing-filename" in info:
        infos += chain_infos(
            info["full-backing-filename"], info.get("backing-filename-format"), True, True
        )
    return infos


def cmd_check(args: argparse.Namespace) -> int:
    """Exit codes as qemu-img check: 0 clean, 1 could not run, 2 corruptions, 3 leaks."""

    fmt_name = resolve_format(args.image, args.fmt)
    progress = cliutil.qemu_progress() if args.progress else None
    if progress:
        progress(0, 1)
    try:
        result, facts = cliutil.check_image_path(
            args.image, fmt_name, args.repair is not None, args.force_share, args.backing_policy
        )
    except ImageLockedError as e:
        if args.repair is not None:
            raise
        result, facts = cliutil.served_check(args.image, e)
    except FvdError as e:
        if not cliutil.is_corrupt(e):
            raise  # locked, unsupported...: the check could not run
        if progress:
            cliutil.progress_done()
        emit(args, cliutil.corrupt_check_json(args.image, fmt_name, e), f"ERROR: {e}")
        return 2
    if progress:
        progress(1, 1)
        cliutil.progress_done()
    data = cliutil.check_json(args.image, fmt_name, result, facts)
    unit = "chunks" if fmt_name == "fvd" else "clusters"
    lines = list(result.messages or [])
    if result.ok:
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines.append(f"{result.corruptions} errors were found on the image.")
        if result.leaks:
            lines.append(f"{result.leaks} leaked {unit} were found on the image.")
    if result.leaks_fixed:
        lines.append(f"{result.leaks_fixed} leaked {unit} were repaired.")
    if result.corruptions_fixed:
        lines.append(f"{result.corruptions_fixed} corruptions were repaired.")
    lines.append(f"{facts['allocated-clusters']}/{facts['total-clusters']} allocated {unit}.")
    lines.append(f"Image end offset: {facts['image-end-offset']}")
    emit(args, data, "\n".join(lines))
    return 2 if result.corruptions else 3 if result.leaks else 0


def cmd_map(args: argparse.Namespace) -> int:

    if args.until is not None and args.since is None:
        raise UsageError("--until needs --since")
    try:
        with open_args(args) as img:
            if args.since is not None:  # changed extents (fvd.ops.changed, or qcow2 trees)
                extents = changed_dicts(img, args.since, args.until)
            else:
                extents = [e.as_dict() for e in img.extents()]
    except ImageLockedError as locked:
        if args.since is None:
            raise
        with cliutil.served(args.image, locked, "map") as client:
            changed = client.changed_extents(args.since, args.until)
        extents = [cliutil.change_dict(c.start, c.length, c.zero) for c in changed]
    if args.output == "json":
        print(json.dumps(extents, indent=None).replace("}, {", "},\n{"))
        return 0
    if args.since is not None:
        print(f"{'Offset':<20}{'Length':<20}Changed to")
        for e in extents:
            print(f"{e['start']:<#20x}{e['length']:<#20x}{'zero' if e['zero'] else 'data'}")
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in extents:
        if e["data"] and "offset" in e:
            print(
                f"{e['start']:#<20x}{e['length']:#<20x}{e.get('offset', 0):#<20x}"
                f"{args.image}".replace("#", " ")
            )
    return 0


def _snapshot_table(snaps: list[dict[str, Any]]) -> str:
    rows = [f"{'ID':<6}{'TAG':<24}{'VM SIZE':>12}  {'DATE':<20}{'VM CLOCK':>16}"]
    for s in snaps:
        created = datetime.datetime.fromtimestamp(s["date-sec"], datetime.timezone.utc)
        clock = s["vm-clock-sec"]
        clock = (
            f"{clock // 3600:04d}:{clock // 60 % 60:02d}:{clock % 60:02d}."
            f"{s['vm-clock-nsec'] // 10**6:03d}"
        )
        rows.append(
            f"{s['id']:<6}{s['name']:<24}{human(s['vm-state-size']):>12}  "
            f"{created.strftime('%Y-%m-%d %H:%M:%S'):<20}{clock:>16}"
        )
    return "\n".join(rows)


def _snapshot_dicts(img: AnyImage) -> list[dict[str, Any]]:

    if isinstance(img, qcow2.Qcow2Image):
        return [
            snapshot_dict(
                s.id, s.name, s.vm_state_size, s.date_sec * 10**9 + s.date_nsec, s.vm_clock_nsec
            )
            for s in img.snapshots()
        ]
    snaps: list[dict[str, Any]] = img.info().get("snapshots", [])
    return snaps


def cmd_snapshot(args: argparse.Namespace) -> int:

    if resolve_format(args.image, args.fmt) == "raw":
        raise UsageError(f"{args.image}: raw images have no internal snapshots")
    try:
        return _snapshot_command(args)
    except ImageLockedError as e:
        if args.apply is not None:
            if find_server(args.image) is not None:
                raise FvdError(f"{e}: fvd serve holds it; stop the server to revert") from None
            raise
        with cliutil.served(args.image, e, "snapshot") as client:
            if args.list:
                snaps = client.info().get("snapshots", [])
                emit(args, snaps, _snapshot_table(snaps))
            elif args.create is not None:
                client.create_snapshot(args.create)
            else:
                client.delete_snapshot(args.delete)
        return 0


def _snapshot_command(args: argparse.Namespace) -> int:
    if args.list:
        with open_args(args) as img:
            snaps = _snapshot_dicts(img)
        emit(args, snaps, _snapshot_table(snaps))
        return 0
    with open_args(args, "r+") as img:
        assert not isinstance(img, RawImage)  # refused above
        if args.create is not None:  # "" is a name (refused), not a missing option
            img.create_snapshot(args.create)
        elif args.delete is not None:
            img.delete_snapshot(args.delete)
        elif args.apply is not None:
            if not isinstance(img, Image):
                raise UsageError(
                    f"{args.image}: applying a snapshot is only supported for fvd images"
                )
            img.revert_to_snapshot(args.apply)
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:

    if resolve_format(args.image, args.fmt) != "fvd":
        raise UsageError(f"{args.image}: prefetch needs an fvd image with a base")
    progress = qemu_progress() if args.progress else None
    with open_image(args.image, "r+", backing=args.backing_policy) as img:
        img.prefetch(progress)
    if progress:
        progress_done()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:

    opts = parse_options(args.options)
    as_json = args.output == "json"
    progress = None
    if args.progress:
        progress = cliutil.json_progress("copying") if as_json else qemu_progress()
    try:
        result = _convert_local(args, opts, progress)
    except ImageLockedError as e:
        snapshot = _snapshot_name(args.snapshot)
        if snapshot is None:
            if find_server(args.src) is None:
                raise
            raise FvdError(
                f"{e}; to copy an image that fvd serve holds, take a snapshot "
                f"(fvd snapshot -c NAME) and convert that (-l NAME)"
            ) from None
        with cliutil.served(args.src, e, "convert") as client:
            result = convert_served(
                client,
                args.dst,
                snapshot=snapshot,
                since=args.since,
                dst_format=args.out_format,
                backing=args.backing,
                backing_format=args.backing_format,
                progress=progress,
                cache=args.cache,
                **opts,
            )
    if progress and not as_json:
        progress_done()
    if as_json:
        print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


def _convert_local(
    args: argparse.Namespace, opts: dict[str, str], progress: Optional[Any]
) -> ConvertResult:
    return convert(
        args.src,
        args.dst,
        src_format=args.fmt,
        dst_format=args.out_format,
        snapshot=_snapshot_name(args.snapshot),
        since=args.since,
        backing=args.backing,
        backing_format=args.backing_format,
        progress=progress,
        force_share=args.force_share,
        cache=args.cache,
        backing_policy=args.backing_policy,
        **opts,
    )


def _snapshot_name(text: Optional[str]) -> Optional[str]:
    """-l NAME, or qemu-img's -l snapshot.name=NAME / snapshot.id=ID."""
    if text is None:
        return None
    for prefix in ("snapshot.name=", "snapshot.id="):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def cmd_checksum(args: argparse.Namespace) -> int:

    progress = qemu_progress() if args.progress else None
    block_size = parse_size(args.block_size)
    try:
        result = _checksum_local(args, block_size, progress)
    except ImageLockedError as e:
        with cliutil.served(args.image, e, "checksum") as client:
            result = client.checksum(args.snapshot, block_size, args.algorithm)
    if progress:
        progress_done()
    emit(args, result, f"{result['checksum']}  {args.image}")
    return 0


def _checksum_local(
    args: argparse.Namespace, block_size: int, progress: Optional[Any]
) -> dict[str, Any]:
    with open_args(args) as img:
        if args.snapshot is not None:
            if not hasattr(img, "open_snapshot"):
                raise UsageError(f"{args.image}: raw images have no snapshots")
            with img.open_snapshot(args.snapshot) as view:
                result = checksum(view, block_size, args.algorithm, progress=progress)
        else:
            # qcow2 and raw images are no DiskView (no `closed`, no `extents_array`): fails
            result = checksum(img, block_size, args.algorithm, progress=progress)
    return result


def cmd_serve(args: argparse.Namespace) -> int:

    if (args.socket is None) == (args.port is None):
        raise UsageError("give exactly one of --socket PATH or --port N")
    return serve(
        args.image,
        snapshot=args.snapshot,
        readonly=args.readonly,
        socket=args.socket,
        port=args.port,
        bind=args.bind,
        shared=args.shared,
        image_format=resolve_format(args.image, args.fmt),
        force_share=args.force_share,
        backing=args.backing_policy,
        tls_certificates=args.tls_certificates,
        tls_psk=args.tls_psk,
        insecure=args.insecure,
        control=args.control,
    )


def cmd_bench(args: argparse.Namespace) -> int:

    return bench.run(args)


# ----- chain operations (fvd.chain) -------------------------------------------
def cmd_commit(args: argparse.Namespace) -> int:
    progress = qemu_progress() if args.progress else None
    chain.commit(args.image, base=args.base, progress=progress, drop=args.drop, top_format=args.fmt)
    if progress:
        progress_done()
    print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    if not args.backing:
        raise UsageError("-b BACKING is required (removing the backing file is not supported)")
    progress = qemu_progress() if args.progress else None
    chain.rebase(
        args.image,
        args.backing,
        backing_format=args.backing_format,
        unsafe=args.unsafe,
        progress=progress,
        image_format=args.fmt,
    )
    if progress:
        progress_done()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0 identical, 1 different, 2 error (as qemu-img compare)."""
    try:
        result = chain.compare_images(
            args.image_a, args.image_b, strict=args.strict, a_format=args.fmt, b_format=args.fmt_b
        )
    except Exception as e:
        if os.environ.get("FVD_DEBUG") == "1":
            raise
        print(f"fvd compare: {_error_line(args, e)}", file=sys.stderr)
        return 2
    for line in result.warnings:
        print(line)
    print(result.message)
    return 0 if result.identical else 1


def cmd_measure(args: argparse.Namespace) -> int:
    opts = {k: parse_size(v) for k, v in parse_options(args.options).items()}
    allowed = {"qcow2": {"cluster_size"}, "fvd": {"chunk_size", "block_size"}, "raw": set()}
    unknown = set(opts) - allowed[args.out_format]
    if unknown:
        raise UsageError(f"unknown option(s) for {args.out_format}: {', '.join(sorted(unknown))}")
    result: dict[str, int] = chain.measure(
        args.image,
        out_format=args.out_format,
        snapshot=_snapshot_name(args.snapshot),
        since=args.since,
        image_format=args.fmt,
        **opts,
    )
    if args.out_format == "qcow2" and resolve_format(args.image, args.fmt) == "qcow2":
        result = {"bitmaps": 0, **result}  # qemu-img shows it when both sides have bitmaps
    text = f"required size: {result['required']}\nfully allocated size: {result['fully-allocated']}"
    if "bitmaps" in result:
        text += f"\nbitmaps size: {result['bitmaps']}"
    emit(args, result, text)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    text = args.size
    with open_args(args) as img:
        current = img.size
    if text[:1] in "+-":
        delta = parse_size(text[1:])
        size = current + delta if text[0] == "+" else current - delta
    else:
        size = parse_size(text)
    chain.resize(args.image, size, shrink=args.shrink, image_format=args.fmt)
    print("Image resized.")
    return 0


def _add_chain_parsers(sub: Any) -> None:
    """commit, rebase, compare, measure, resize: qemu-img's names and options."""
    c = _command(sub, "commit")
    c.add_argument("-b", dest="base", metavar="BASE", help="commit into this deeper backing file")
    c.add_argument("-d", dest="drop", action="store_true", help="do not empty the top image")
    _progress_option(c)
    c.add_argument("image", metavar="TOP")

    r = _command(sub, "rebase")
    r.add_argument("-b", dest="backing", required=True, metavar="BACKING", help="new backing")
    r.add_argument("-F", dest="backing_format", choices=FORMATS, help="new backing's format")
    r.add_argument("-u", dest="unsafe", action="store_true", help="header only, copy nothing")
    _progress_option(r)
    r.add_argument("image")

    m = _command(sub, "compare")
    m.add_argument("-F", dest="fmt_b", choices=FORMATS, help="format of the second image")
    m.add_argument("-s", dest="strict", action="store_true", help="sizes and allocation too")
    m.add_argument("image_a", metavar="A")
    m.add_argument("image_b", metavar="B")

    e = _command(sub, "measure")
    e.add_argument("-O", dest="out_format", default="qcow2", choices=FORMATS, help="output")
    e.add_argument("-o", dest="options", metavar="OPTS", help="cluster_size= / chunk_size=")
    _snapshot_option(e, "measure a snapshot")
    e.add_argument("--since", metavar="SNAPSHOT", help="measure the incremental since it")
    _output_option(e)
    e.add_argument("image")

    z = _command(sub, "resize")
    z.add_argument("--shrink", action="store_true", help="allow a smaller size")
    z.add_argument("image")
    z.add_argument("size", help="new size, or +SIZE / -SIZE")


# ----- parser -----------------------------------------------------------------
# Every command: the function that runs it and its line in `fvd --help`.
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "create": (cmd_create, "create a new image"),
    "info": (cmd_info, "show header facts, allocation and snapshots"),
    "check": (cmd_check, "check consistency (exit 0 clean, 2 corrupt, 3 leaks)"),
    "map": (cmd_map, "show the allocation map (as qemu-img map)"),
    "snapshot": (cmd_snapshot, "list, create, delete or apply internal snapshots"),
    "prefetch": (cmd_prefetch, "copy the base image into the image"),
    "serve": (cmd_serve, "export the image over NBD (nbdkit), in the foreground"),
    "convert": (
        cmd_convert,
        "convert, export or back up an image (as qemu-img convert); "
        "--since S -B PREV writes an incremental backup",
    ),
    "checksum": (
        cmd_checksum,
        "checksum of the guest data, equal to ovirt-imageio's (blkhash) "
        "of the same content in any format",
    ),
    "bench": (cmd_bench, "FVD against the QCOW2 baseline, raw and QEMU"),
    "commit": (cmd_commit, "merge an overlay into its backing file (qemu-img commit)"),
    "rebase": (cmd_rebase, "change the backing file (qemu-img rebase)"),
    "compare": (cmd_compare, "compare two images (exit 0 same, 1 different, 2 error)"),
    "measure": (cmd_measure, "bytes a conversion needs (qemu-img measure)"),
    "resize": (cmd_resize, "grow (or with --shrink cut unused space off) an image"),
}


def _command(sub: Any, name: str) -> argparse.ArgumentParser:
    """The parser of command `name` (COMMANDS says what runs it)."""
    func, text = COMMANDS[name]
    parser: argparse.ArgumentParser = sub.add_parser(name, help=text)
    parser.set_defaults(func=func)
    return parser


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=["human", "json"], default="human")


def _snapshot_option(parser: argparse.ArgumentParser, text: str) -> None:
    """-l SNAPSHOT: work on an internal snapshot (`text` says how)."""
    parser.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help=text)


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", dest="progress", action="store_true", help="show progress")


def _force_share_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open even while another handle writes it (best-effort view)",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (as qemu-img), not argparse's 2: 2 means "corruptions"."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# Commands that take no -f (every other command gets `-f fvd|qcow2|raw`, see below).
NO_FORMAT_OPTION = {"bench", "create"}


def _add_format_options(parsers: Mapping[str, argparse.ArgumentParser]) -> None:
    """-f FMT on every command that opens an image (probed by magic when absent)."""

    for name, parser in parsers.items():
        if name in NO_FORMAT_OPTION:
            continue
        with contextlib.suppress(argparse.ArgumentError):  # the command has its own -f
            parser.add_argument(
                "-f",
                dest="fmt",
                choices=FORMATS,
                help="image format (default: probed; fvd and qcow2 by magic)",
            )


def _add_backing_options(parsers: Mapping[str, argparse.ArgumentParser]) -> None:
    """--backing=any|same-dir|none on every command that opens an image."""
    for name, parser in parsers.items():
        if name == "bench":
            continue
        parser.add_argument(
            "--backing",
            dest="backing_policy",
            choices=BACKING_POLICIES,
            default="any",
            help="backing files the image's chain may use: any (default), same-dir (only "
            "files in the image's own directory), none (untrusted images: refuse any)",
        )


def _add_create_parser(sub: Any) -> None:
    """fvd create."""
    c = _command(sub, "create")
    c.add_argument("-b", dest="backing", metavar="BASE", help="base (backing) image")
    c.add_argument(
        "-F", dest="backing_format", choices=sorted(fmt.BASE_FORMATS), help="base image format"
    )
    c.add_argument(
        "-o",
        dest="options",
        metavar="OPTS",
        help="chunk_size=SIZE,block_size=SIZE,journal_size=SIZE,table=on|off",
    )
    c.add_argument(
        "-f",
        dest="fmt",
        default="fvd",
        choices=["fvd", "qcow2", "raw"],
        help="image format (qcow2 through fvd.qcow2: -o cluster_size=,lazy_refcounts=)",
    )
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c.add_argument("image")
    c.add_argument("size", nargs="?", help="virtual size, e.g. 10G (default: base size)")


def _add_inspect_parsers(sub: Any) -> None:
    """fvd info, check, map and snapshot."""
    i = _command(sub, "info")
    _output_option(i)
    i.add_argument("--backing-chain", action="store_true", help="also every base below")
    _force_share_option(i)
    i.add_argument("image")

    k = _command(sub, "check")
    k.add_argument("-r", dest="repair", choices=["leaks", "all"], help="repair")
    _output_option(k)
    _progress_option(k)
    _force_share_option(k)
    k.add_argument("image")

    m = _command(sub, "map")
    _output_option(m)
    m.add_argument("--since", metavar="SNAP", help="only ranges changed since snapshot SNAP")
    m.add_argument("--until", metavar="SNAP", help="... up to snapshot SNAP (default: now)")
    _force_share_option(m)
    m.add_argument("image")

    s = _command(sub, "snapshot")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("-l", dest="list", action="store_true", help="list snapshots")
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    g.add_argument("-a", dest="apply", metavar="NAME", help="revert to a snapshot")
    _output_option(s)
    _force_share_option(s)
    s.add_argument("image")


def _add_serve_parsers(sub: Any) -> None:
    """fvd prefetch and serve."""
    f = _command(sub, "prefetch")
    _progress_option(f)
    f.add_argument("image")

    v = _command(sub, "serve")
    _snapshot_option(v, "serve a snapshot (read-only)")
    v.add_argument(
        "-r", "--read-only", dest="readonly", action="store_true", help="read-only export"
    )
    v.add_argument("--socket", metavar="PATH", help="listen on a unix socket")
    v.add_argument("--port", type=int, metavar="N", help="listen on a TCP port")
    v.add_argument(
        "--bind", metavar="ADDR", help="TCP address to listen on (default localhost only)"
    )
    v.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="require TLS with X.509 certificates (DIR holds ca-cert.pem, "
        "server-cert.pem, server-key.pem)",
    )
    v.add_argument(
        "--tls-psk", metavar="FILE", help="require TLS with pre-shared keys (username:hexkey)"
    )
    v.add_argument(
        "--insecure",
        action="store_true",
        help="allow a read-write TCP export without TLS (anyone reaching the port can write)",
    )
    v.add_argument("--shared", type=int, metavar="N", help="at most N clients at once")
    v.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (unix, 0600; default IMAGE.ctl for a read-write fvd export)",
    )
    _force_share_option(v)
    v.add_argument("image")


def _add_convert_parser(sub: Any) -> None:
    """fvd convert."""
    v = _command(sub, "convert")
    v.add_argument(
        "-O",
        dest="out_format",
        default="fvd",
        choices=["fvd", "raw", "qcow2"],
        help="output format (default fvd)",
    )
    _snapshot_option(v, "convert this internal snapshot (NAME or snapshot.name=NAME)")
    v.add_argument(
        "--since", metavar="SNAPSHOT", help="copy only what changed since this snapshot (needs -B)"
    )
    v.add_argument(
        "-B",
        dest="backing",
        metavar="BACKING",
        help="the output's backing file (relative to the output's directory)",
    )
    v.add_argument(
        "-F", dest="backing_format", choices=["fvd", "raw", "qcow2"], help="backing file format"
    )
    v.add_argument(
        "-o",
        dest="options",
        metavar="OPTS",
        help="fvd: chunk_size=,block_size=,table=on|off; qcow2: cluster_size=,lazy_refcounts=",
    )
    _progress_option(v)
    v.add_argument(
        "-t",
        dest="cache",
        default="writeback",
        choices=["writeback", "unsafe"],
        help="writeback (default): DST is flushed before it is renamed into "
        "place; unsafe: no flush (qemu-img convert's default)",
    )
    v.add_argument(
        "--output",
        choices=["human", "json"],
        default="human",
        help="json: the result as one JSON object on stdout (with -p, one JSON object "
        "per progress step before it)",
    )
    _force_share_option(v)
    v.add_argument("src")
    v.add_argument("dst")


def _add_checksum_bench_parsers(sub: Any) -> None:
    """fvd checksum and bench."""
    h = _command(sub, "checksum")
    _snapshot_option(h, "checksum a snapshot")
    _progress_option(h)
    h.add_argument("--block-size", default="4M", help="blkhash block size (default 4M)")
    h.add_argument("--algorithm", default="blake2b", help="hashlib algorithm (blake2b)")
    _output_option(h)
    _force_share_option(h)
    h.add_argument("image")

    b = _command(sub, "bench")
    try:
        bench.add_arguments(b)
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fvd",
        description="Create, inspect, convert and benchmark FVD copy-on-write disk images.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_create_parser(sub)
    _add_inspect_parsers(sub)
    _add_serve_parsers(sub)
    _add_convert_parser(sub)
    _add_checksum_bench_parsers(sub)
    _add_chain_parsers(sub)
    _add_format_options(sub.choices)
    _add_backing_options(sub.choices)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"fvd: {e}", file=sys.stderr)
        return 1
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError as e:
        if _stdout_broken():
            return _stdout_closed()
        print(f"fvd {args.command}: {_error_line(args, e)}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"fvd {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fvd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a traceback (FVD_DEBUG=1 re-raises)
        if os.environ.get("FVD_DEBUG") == "1":
            raise
        print(f"fvd {args.command}: {_error_line(args, e)}", file=sys.stderr)
        return 1


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (`fvd info ... | head -1`): not the image's fault,
    so no message. Later writes (the interpreter's own flush at exit) go to /dev/null,
    as the Python documentation recommends; the exit code is 141 (128 + SIGPIPE), what a
    shell shows for a command that SIGPIPE ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _error_line(args: argparse.Namespace, e: BaseException) -> str:
    """One line naming the file and the problem."""
    name = getattr(args, "image", None) or getattr(args, "src", None)
    if isinstance(e, FvdError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError):
        return f"{e.filename or name}: {e.strerror or e}"
    if isinstance(e, KeyError):
        return f"{name}: {e.args[0] if e.args else e}"
    if isinstance(e, ValueError):
        return str(e).splitlines()[0] if str(e) else "invalid value"
    return f"{name}: {type(e).__name__}: {e}".splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
