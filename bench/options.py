"""The benchmarks' command-line options from their defaults (imported by the bench scripts; runs nothing)."""

from __future__ import annotations

import argparse


def add_options(parser: argparse.ArgumentParser, **defaults: object) -> argparse.ArgumentParser:
    """One ``--name`` (underscores written as dashes) per keyword: False is a flag (store_true), None a string
    defaulting to None, any other default typed as itself (int, float, str)."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true")
        elif default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser
