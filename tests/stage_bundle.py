"""A bundle-shaped directory for one stage, made from the fetched model files (for factory tests)."""

from __future__ import annotations

import os
from pathlib import Path

from edge.bundle import FileEntry, StageSpec
from export.recipes import load_recipe


def bundle_stage(root: Path, cache: Path, recipe_name: str, stage: str) -> tuple[StageSpec, Path]:
    """Link the bundled files of ``recipe_name`` as ``ROOT/STAGE/NAME`` and return a ``StageSpec``
    naming them by role (``config['files']``), as the bundle builder writes it, plus ``root``."""
    recipe = load_recipe(recipe_name)
    (root / stage).mkdir()
    files, roles = [], {}
    for f in recipe.files:
        if not f.in_bundle:
            continue
        rel = f"{stage}/{f.name}"
        os.symlink(cache / "models" / recipe.name / f.name, root / rel)
        files.append(FileEntry(rel, f.sha256, f.size))
        roles[f.role] = rel
    spec = StageSpec(kind=recipe.kind, runtime="onnxruntime", files=files, sample_rate=recipe.sample_rate,
                     config={"files": roles})
    return spec, root
