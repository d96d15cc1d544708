"""The ``pgttt`` command: one entry point, a subcommand per capability.

Each folder registers its own subcommands (``register(subparsers)``), so the command line of a
capability lives next to it. Errors meant for users are printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import PgtttError

# module -> the subcommands it registers (imported lazily so `pgttt inspect` never imports FastAPI).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "pgttt.checkpoints.cli": ("inspect", "import"),
    "pgttt.ttt.cli": ("eval",),
    "pgttt.budget.cli": ("estimate",),
    "pgttt.app.cli": ("serve",),
    "pgttt.client.sweep_cli": ("sweep", "report"),
    "pgttt.client.compare_cli": ("compare",),
    "pgttt.training.cli": ("train",),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgttt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pgttt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, commands in COMMAND_MODULES.items():
        if only is not None and only not in commands:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module that owns the chosen subcommand; fall back to all for --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    known = {c for cmds in COMMAND_MODULES.values() for c in cmds}
    parser = build_parser(chosen if chosen in known else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PgtttError as exc:
        print(f"pgttt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pgttt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
