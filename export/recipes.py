"""Model recipes (``models/recipes/*.toml``): which real model serves each stage and where it comes from.

A recipe names the PyPI package(s) whose wheel carries the weights, the path of each file inside
the wheel (or the ordered parts to join), its sha256 and size, license, format, sample rate,
I/O names and the accuracy gates its export must pass.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.boards import REPO_ROOT
from edge.errors import ConfigError


def recipes_dir() -> Path:
    """``$SOTTOVOCE_RECIPES`` or the repository's ``models/recipes``."""
    return Path(os.environ.get("SOTTOVOCE_RECIPES", REPO_ROOT / "models" / "recipes"))


@dataclass(frozen=True)
class WheelPart:
    package: str
    path: str


@dataclass(frozen=True)
class RecipeFile:
    """One file a recipe provides: copied from one wheel member, or joined from several."""

    name: str
    role: str
    sha256: str
    size: int
    parts: tuple[WheelPart, ...]
    in_bundle: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: str
    kind: str
    license: str
    format: str
    packages: dict[str, str]  # name -> version
    files: tuple[RecipeFile, ...]
    default: bool = False
    sample_rate: int | None = None
    io: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, role: str) -> RecipeFile:
        for f in self.files:
            if f.role == role or f.name == role:
                return f
        raise ConfigError(f"recipe {self.name} has no file with role {role!r}")

    @property
    def source(self) -> dict[str, Any]:
        """Where the weights come from, as recorded in a bundle manifest."""
        return {
            "recipe": self.name,
            "packages": [f"{n}=={v}" for n, v in sorted(self.packages.items())],
            "license": self.license,
            "format": self.format,
        }


_KNOWN_KEYS = {"name", "stage", "kind", "license", "format", "packages", "files", "default", "sample_rate", "io", "gates"}


def _parse(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from exc
    try:
        packages = {p["name"]: p["version"] for p in data["packages"]}
        files = []
        for f in data["files"]:
            if "join" in f:
                parts = tuple(WheelPart(p["package"], p["path"]) for p in f["join"])
            else:
                parts = (WheelPart(f["package"], f["path"]),)
            for part in parts:
                if part.package not in packages:
                    raise ConfigError(f"recipe {path.name}: file {f['name']} names package {part.package} not listed")
            files.append(
                RecipeFile(
                    name=f["name"],
                    role=f.get("role", f["name"]),
                    sha256=f["sha256"],
                    size=int(f["size"]),
                    parts=parts,
                    in_bundle=bool(f.get("bundle", True)),
                )
            )
        return Recipe(
            name=data["name"],
            stage=data["stage"],
            kind=data["kind"],
            license=data["license"],
            format=data["format"],
            packages=packages,
            files=tuple(files),
            default=bool(data.get("default", False)),
            sample_rate=data.get("sample_rate"),
            io=data.get("io", {}),
            gates=data.get("gates", {}),
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )
    except KeyError as exc:
        raise ConfigError(f"recipe {path.name} lacks the field {exc}") from exc


def all_recipes() -> dict[str, Recipe]:
    """Every recipe, by name."""
    recipes = [_parse(p) for p in sorted(recipes_dir().glob("*.toml"))]
    return {r.name: r for r in recipes}


def load_recipe(name: str) -> Recipe:
    """One recipe by name; an unknown name lists the known ones."""
    recipes = all_recipes()
    if name not in recipes:
        raise ConfigError(f"unknown model recipe {name!r}; known: {', '.join(sorted(recipes))}")
    return recipes[name]


def default_recipes() -> list[Recipe]:
    """The default model set: one recipe per stage marked ``default = true``."""
    return [r for r in all_recipes().values() if r.default]
