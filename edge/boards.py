"""Board profiles (``hw/boards/*.toml``): what a target is and how to run on it.

The exporter reads a profile to decide quantization, the runtime to pick providers, threads,
audio devices and VAD timing, and the profiler to judge latencies against budgets. A bundle
carries a copy of its target's profile in its manifest, so a board needs no ``hw/`` tree.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def boards_dir() -> Path:
    """Directory of board profiles (``$SOTTOVOCE_BOARDS`` or the repository's ``hw/boards``)."""
    return Path(os.environ.get("SOTTOVOCE_BOARDS", REPO_ROOT / "hw" / "boards"))


def known_boards() -> list[str]:
    """Names of every board profile available."""
    return sorted(p.stem for p in boards_dir().glob("*.toml"))


@dataclass(frozen=True)
class BoardProfile:
    """A parsed board profile; ``data`` is the TOML content, ``sha256`` the hash of its bytes."""

    name: str
    data: dict[str, Any]
    sha256: str

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name, {}))

    @property
    def providers(self) -> list[str]:
        return list(self.data.get("runtime", {}).get("providers", ["CPUExecutionProvider"]))

    @property
    def threads(self) -> int:
        return int(self.data.get("runtime", {}).get("threads", 2))

    def to_manifest(self) -> dict[str, Any]:
        """What a bundle manifest stores as ``target``."""
        return {"name": self.name, "sha256": self.sha256, "profile": self.data}

    @classmethod
    def from_manifest(cls, target: dict[str, Any]) -> "BoardProfile":
        return cls(name=target["name"], data=target.get("profile", {}), sha256=target.get("sha256", ""))


def load_board(name: str) -> BoardProfile:
    """Load ``hw/boards/NAME.toml``; an unknown name raises ``ConfigError`` listing the known ones."""
    path = boards_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(known_boards())}")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"board profile {path} is not valid TOML: {exc}") from exc
    return BoardProfile(name=name, data=data, sha256=hashlib.sha256(raw).hexdigest())
