"""`sarmerge` command line: one subcommand per feature module, imported only when it runs.

Library subcommands live in `sarmerge/`; pipeline subcommands (e.g. `register`, which needs MLflow) are plugged in by
the `tasks` package through the `sarmerge.commands` entry-point group, so the library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from sarmerge import __version__
from sarmerge.errors import run_cli

# subcommand → module with `add_command(subparsers)`
COMMANDS = {
    "merge": "sarmerge.merge",
    "fisher": "sarmerge.fisher",
    "methods": "sarmerge.methods_cli",
    "evaluate": "sarmerge.evaluate.cli",
    "analyze": "sarmerge.analysis.cli",
    "zoo": "sarmerge.zoo.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarmerge", description="Merge RLVR checkpoints with SAR-Merging and friends."
    )
    parser.add_argument("--version", action="version", version=f"sarmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    plugins = {ep.name: ep for ep in entry_points(group="sarmerge.commands")}
    wanted = next((a for a in argv if not a.startswith("-")), None)
    # Import only the module of the subcommand being run (fast startup); for help, import all of them.
    for name, module in COMMANDS.items():
        if wanted in (None, name) or wanted not in {**COMMANDS, **plugins}:
            importlib.import_module(module).add_command(sub)
    for name, ep in plugins.items():
        if wanted in (None, name) or wanted not in {**COMMANDS, **plugins}:
            ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_cli(f"sarmerge {args.command}", lambda: args.func(args))
    except KeyboardInterrupt:
        print(f"sarmerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
