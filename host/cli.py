"""Command line of the host tool: ``flash``, ``devices`` (and later ``profile``, ``cloud``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the host tool's subcommands to the top-level parser."""
