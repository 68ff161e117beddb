"""The benchmarks' command-line options from their defaults (imported by the bench scripts; runs nothing)."""

from __future__ import annotations

import argparse

INTERNAL = argparse.SUPPRESS
"""The help of an option a bench passes to its own child processes: hidden from --help."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (its examples keep their lines) and each option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        shown = not any(action.default is hidden for hidden in (None, False, argparse.SUPPRESS))  # 0 is shown
        if shown and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help is the bench's docstring, then its options with their defaults."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_options(parser: argparse.ArgumentParser, **options: tuple[object, str]) -> argparse.ArgumentParser:
    """One ``--name`` (underscores written as dashes) per keyword, given as ``(default, help)``: a False default
    is a flag (store_true), None a string defaulting to None, any other default typed as itself (int, float,
    str).  A help of ``INTERNAL`` hides an option the bench only passes to its own child processes."""
    for name, (default, help) in options.items():
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true", help=help)
        elif default is None:
            parser.add_argument(flag, default=None, help=help)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help)
    return parser
