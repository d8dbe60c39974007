"""The ``rece`` command: a thin shell over the library. Errors print one line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import ReceError

Handler = Callable[[argparse.Namespace], int]


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_store

    report = validate_store(args.store)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rece", description="RECE latency-model training for BLIS")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check every table and configuration in a store")
    v.add_argument("store", help="local folder or s3://bucket/prefix")
    v.set_defaults(fn=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ReceError as exc:
        print(f"rece: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rece: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
