"""The ``pyshmfeed`` command line: one subcommand per module, found through a small dispatch table.

A subcommand module provides ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status), and imports no framework at its
top level: every module in the table is imported to build ``--help``. To add
``doctor``, ``inspect`` or ``cleanup``: write ``pyshmfeed/<name>.py`` with
those three names and add one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing HELP, add_arguments(parser), run(args)
COMMANDS: dict[str, str] = {
    "bench": "pyshmfeed.bench.command",
    "doctor": "pyshmfeed.doctor",
    "inspect": "pyshmfeed.inspect_rings",
    "cleanup": "pyshmfeed.cleanup",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyshmfeed", description="pyshmfeed: keep GPUs fed from a shared-memory ring written by Ray producers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"pyshmfeed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except KeyboardInterrupt:
        print("pyshmfeed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
