"""The one `moesim` command. Each concern registers its own subcommands from its own package;
this module only parses, dispatches, and turns bad input into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from moesim import __version__
from moesim.errors import InputError

# command -> (module with `register(subparsers)`, one-line help). A module is imported only
# when its command runs, so `moesim --help` and the torch-free commands (trace, plan) start
# without torch, triton or matplotlib. A module may register several commands (simulate,
# sweep); list each. A subcommand is listed only once it works.
COMMANDS: dict[str, tuple[str, str]] = {
    "trace": ("traces.cli", "generate, inspect and convert routing traces"),
    "plan": ("planner.cli", "plan expert placement (FSEP re-layout ILP, EP, HP)"),
    "simulate": ("moesim.commands.simulate", "simulate EP, HP and FSEP steps on a cluster"),
    "sweep": ("moesim.commands.simulate",
              "simulate a grid of strategies x cluster sizes x traces"),
    "study": ("moesim.commands.study", "run a study file (configs/studies/*.toml)"),
    "calibrate": ("moesim.commands.calibrate",
                  "measure compute rates into a calibration CSV, or fit network terms to "
                  "nccl-tests output"),
    "bench-net": ("moesim.commands.bench_net",
                  "simulated collectives in nccl-tests' table format"),
    "memory": ("moesim.commands.memory", "peak memory per GPU of a configuration, and "
               "whether it fits"),
    "validate": ("moesim.commands.validate",
                 "simulate a runtime run and compare with its timings"),
    "plot": ("analysis.cli", "paper-style figures from result files"),
    "run": ("runtime.cli", "train the MoE transformer with EP, HP or FSEP (torchrun)"),
}

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed; only the chosen command's module is imported
    (all of them with `argv=None`, for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Simulate, plan and run MoE parallelism: EP, Head Parallel and FSEP.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = COMMANDS.get(_chosen(argv) or "", ("", ""))[0] if argv is not None else None
    for name, (module, help_) in COMMANDS.items():
        if name in sub.choices:
            continue
        if chosen is None or module == chosen:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
