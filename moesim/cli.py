"""The one `moesim` command. Each concern registers its own subcommands from its own package;
this module only parses, dispatches, and turns bad input into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from moesim import __version__
from moesim.errors import InputError

# Each module has `register(subparsers)`; a subcommand is listed only once it works.
COMMAND_MODULES = [
    "traces.cli",
    "planner.cli",
    "moesim.calibrate",
    "moesim.validate",
    "moesim.simulate_cli",
    "analysis.cli",
    "runtime.cli",
]

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Simulate, plan and run MoE parallelism: EP, Head Parallel and FSEP.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except InputError as e:
        print(f"moesim: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
