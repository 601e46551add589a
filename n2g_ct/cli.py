"""The ``n2g-ct`` command line: parse arguments, call one library function per command.

Heavy imports (torch, pydicom codecs, matplotlib) happen inside the commands, so ``--help`` is fast.
Errors a user can act on (:class:`n2g_ct.errors.N2GError`) print one message and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from n2g_ct import __version__
from n2g_ct.errors import N2GError

log = logging.getLogger("n2g_ct")

EXIT_USER_ERROR = 2


def _cmd_info(args: argparse.Namespace) -> int:
    from n2g_ct.io.summary import describe_path

    print(describe_path(args.path, allow_non_ct=args.allow_non_ct))
    return 0


def _add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe the CT series / NIfTI volumes found at a path (no patient data shown)",
        description="List each series found: slices, modality, size, spacing, HU range, transfer syntax.",
    )
    parser.add_argument("path", type=Path, help="DICOM file, series folder, folder tree, or NIfTI file")
    parser.add_argument("--allow-non-ct", action="store_true", help="also read series whose modality is not CT")
    parser.set_defaults(handler=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The full ``n2g-ct`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="n2g-ct",
        description="Noise2Grad denoising for low-dose CT: train without paired scans, denoise DICOM, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"n2g-ct {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info_parser(subparsers)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n2g-ct``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args))
    except N2GError as exc:
        print(f"n2g-ct {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"n2g-ct {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
