"""Disk space for exports: a check before writing and a guard that turns a full disk into one clear sentence."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge.errors import SottovoceError

MB = 1_000_000


class DiskSpaceError(SottovoceError):
    """Not enough free disk space for what an export or a bundle is about to write."""

    code = "disk.full"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (``shutil.disk_usage`` needs one)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def disk_space_message(path: Path, needed: int | None) -> str:
    """One sentence naming ``path``, the MB ``needed`` (when known) and the MB free there."""
    free = shutil.disk_usage(_existing(path)).free
    need = f"the export needs about {needed / MB:.0f} MB, " if needed is not None else ""
    return f"not enough disk space at {path}: {need}{free / MB:.0f} MB free"


def require_free_space(path: Path, needed: int) -> None:
    """Raise ``DiskSpaceError`` (``disk_space_message``) unless the filesystem of ``path`` has ``needed``
    bytes free; call it before writing ``needed`` bytes under ``path``."""
    if shutil.disk_usage(_existing(path)).free < needed:
        raise DiskSpaceError(disk_space_message(path, needed))


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception that caused it is an out-of-space write error."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextmanager
def disk_full_guard(path: Path, needed: int | None) -> Iterator[None]:
    """Run the body; an error caused by a full disk (``ENOSPC``/``EDQUOT``, also wrapped in another
    exception) becomes the same one-line ``DiskSpaceError`` as ``require_free_space``'s."""
    try:
        yield
    except DiskSpaceError:
        raise
    except Exception as exc:
        if _disk_full(exc):
            raise DiskSpaceError(disk_space_message(path, needed)) from exc
        raise
