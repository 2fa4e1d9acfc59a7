"""``sottovoce``: parse, dispatch to the part that owns the subcommand, print errors in one line.

Each part (``edge.cli``, ``export.cli``, ``host.cli``) registers its subcommands here; they keep
heavy imports (onnxruntime, torch) inside the handlers so ``sottovoce --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge.errors import SottovoceError

EPILOG = """\
parts:
  models fetch, export, keys, bundle    workstation toolchain (export/)
  run, edge serve, edge install          board runtime (edge/)
  flash, devices                         host tool (host/)
  demo                                   all of it: export, flash a virtual device, answer a spoken question

Run `sottovoce COMMAND --help` for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every part's subcommands)."""
    from edge import cli as edge_cli
    from export import cli as export_cli
    from host import cli as host_cli

    parser = argparse.ArgumentParser(
        prog="sottovoce",
        description="Offline voice assistants on edge boards: export models, flash boards, run the voice loop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="sottovoce 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    export_cli.register(sub)
    edge_cli.register(sub)
    host_cli.register(sub)
    from sottovoce import demo

    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SottovoceError as err:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": {"code": err.code, "message": str(err)}}))
        print(f"sottovoce: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sottovoce: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
