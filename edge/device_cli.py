"""``sottovoce edge serve`` (the device daemon) and ``sottovoce edge install`` (the board installer)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``edge`` group (``serve``, ``install``) to the top-level parser."""
    edge = sub.add_parser("edge", help="the device daemon and its installer (runs on the board)")
    esub = edge.add_subparsers(dest="edge_command", metavar="ACTION", required=True)

    serve = esub.add_parser(
        "serve",
        help="hold the A/B slot store and answer the control protocol (flash, status, slots)",
        description="The device daemon. At start it tries a pending slot once (health check) and keeps the "
        "previous slot if that fails; then it answers hello/status/flash/slot requests on a serial link "
        "(COBS + CRC32) and/or TCP (token required). With --voice it also runs the voice loop on the "
        "active slot; flashing works while it runs.",
    )
    serve.add_argument("--root", type=Path, default=Path("/var/lib/sottovoce"), help="device root (slots, state.json)")
    serve.add_argument("--serial", help="tty to serve (e.g. /dev/ttyGS0), or 'pty' for a new pseudo-terminal")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="listen for TCP clients (port 0: any free port)")
    serve.add_argument("--token", help="pre-shared token TCP clients must prove (or --token-file, $SOTTOVOCE_TOKEN)")
    serve.add_argument("--token-file", type=Path, help="file holding the token (first line)")
    serve.add_argument("--allow-unsigned", action="store_true", help="accept bundles without a signature")
    serve.add_argument("--trust", type=Path, action="append", default=[],
                       help="public key bundle signatures must verify against (repeatable; also ROOT/trusted/*.pub)")
    serve.add_argument("--health-check", metavar="MODULE:FUNC",
                       help="health check a new slot must pass (default edge.runtime:health_check)")
    serve.add_argument("--quota", type=int, help="bytes the slot store may use in all (default: the disk)")
    serve.add_argument("--board", help="this device's board profile; bundles for another target are refused")
    serve.add_argument("--no-mdns", dest="mdns", action="store_false",
                       help="do not announce the TCP port over mDNS (_sottovoce._tcp)")
    serve.add_argument("--voice", action="store_true", help="also run the voice loop on the active slot")
    serve.add_argument("--voice-input", default="device", help="'device', a WAV file, or - (raw s16le on stdin)")
    serve.add_argument("--voice-output", help="reply WAV file (default: the output device / discard)")
    serve.set_defaults(func=cmd_serve)

    install = esub.add_parser(
        "install",
        help="install the edge-only environment, the systemd unit and the udev rule under a prefix",
        description="Create PREFIX/opt/sottovoce (a venv with the edge extra only: never torch), "
        "PREFIX/etc/systemd/system/sottovoce-edge.service, PREFIX/etc/udev/rules.d/90-sottovoce-gadget.rules and "
        "PREFIX/var/lib/sottovoce. --prefix / installs on the board itself.",
    )
    install.add_argument("--prefix", type=Path, required=True, help="root to install into (/ on a board)")
    install.add_argument("--no-venv", action="store_true", help="write files only; do not create the venv")
    install.add_argument("--wheelhouse", type=Path, help="install from these wheels only (offline board)")
    install.set_defaults(func=cmd_install)


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return args.token
    if args.token_file:
        return args.token_file.read_text("utf-8").splitlines()[0].strip()
    return os.environ.get("SOTTOVOCE_TOKEN") or None


def cmd_serve(args: argparse.Namespace) -> int:
    from edge.daemon import serve

    return serve(args.root, serial=args.serial, tcp=args.tcp, token=_token(args), allow_unsigned=args.allow_unsigned,
                 trust=args.trust, health_check=args.health_check, quota=args.quota, board=args.board,
                 voice=args.voice, voice_input=args.voice_input, voice_output=args.voice_output, mdns=args.mdns)


def cmd_install(args: argparse.Namespace) -> int:
    import subprocess

    from edge.boards import REPO_ROOT
    from edge.errors import ConfigError

    script = REPO_ROOT / "hw" / "install.sh"
    if not script.is_file():
        raise ConfigError(f"installer {script} is missing from this checkout")
    env = dict(os.environ, PREFIX=str(args.prefix.resolve()), SRC=str(REPO_ROOT))
    if args.no_venv:
        env["NO_VENV"] = "1"
    if args.wheelhouse:
        env["WHEELHOUSE"] = str(args.wheelhouse.resolve())
    proc = subprocess.run(["sh", str(script)], env=env)
    if proc.returncode != 0:
        raise ConfigError(f"installer failed (exit {proc.returncode}); see its output above")
    return 0
