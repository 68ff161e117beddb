"""What the subcommands that read images share on the command line: a subparser that takes PATH arguments."""

from __future__ import annotations

import argparse

PATHS_HELP = "image files, folders (searched recursively) or globs"


def add_paths_command(sub, name: str, formatter_class, **parser_kwargs) -> argparse.ArgumentParser:
    """The subcommand ``name`` (``parser_kwargs``: its help, description, epilog) with its one or more PATHs."""
    parser = sub.add_parser(name, formatter_class=formatter_class, **parser_kwargs)
    parser.add_argument("paths", nargs="+", metavar="PATH", help=PATHS_HELP)
    return parser
