"""The progress bar of ``sottovoce flash``: bytes the device acknowledged, throughput and ETA (rich)."""

from __future__ import annotations

import sys
from typing import Any


class FlashProgress:
    """Context manager; ``update(done, total)`` follows the device's acknowledged offset, ``log`` prints above it."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "FlashProgress":
        return self

    def _start(self) -> None:
        if self.enabled and self._progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=Console(file=sys.stderr), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None)

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes (the bar appears on the first update: after the device said hello)."""
        self._start()
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif self.enabled:
            print(message, file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
