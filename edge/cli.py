"""Command line of the board runtime: ``run``, ``bundle``, ``edge``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the runtime's subcommands to the top-level parser."""
