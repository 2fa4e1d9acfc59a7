"""Command line of the host tool: ``flash``, ``devices`` (and later ``profile``, ``cloud``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the host tool's subcommands to the top-level parser."""
    flash = sub.add_parser(
        "flash",
        help="send a bundle to a device, verify it there and boot it",
        description="Flash BUNDLE (.svb) to the device at --port: a pyserial URL (/dev/ttyACM0, socket://host:port) "
        "or tcp://host:port (needs --token). Re-running an interrupted flash continues where it stopped. The "
        "device reports the sha256 it computed (verify-after-write); with --activate (default) it boots the new "
        "slot and answers its health verdict, going back to the previous slot by itself on failure. "
        "With --fleet INVENTORY.toml, flashes every device listed there concurrently.",
    )
    flash.add_argument("bundle", type=Path, help="packed bundle (.svb)")
    flash.add_argument("--port", help="device URL: /dev/ttyACM0, socket://host:port, tcp://host:port")
    flash.add_argument("--token", help="pre-shared device token for tcp:// (or $SOTTOVOCE_TOKEN)")
    flash.add_argument("--activate", dest="activate", action="store_true", default=True,
                       help="boot the new slot and wait for its health verdict (default)")
    flash.add_argument("--no-activate", dest="activate", action="store_false", help="only install it, pending")
    flash.add_argument("--force", action="store_true",
                       help="send the bundle even if the device already holds it in a slot")
    flash.add_argument("--fleet", type=Path, metavar="INVENTORY.toml", help="flash every device in the inventory")
    flash.add_argument("--jobs", type=int, default=8, help="devices flashed at once with --fleet")
    flash.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    flash.add_argument("--json", action="store_true", help="print the result as JSON")
    flash.set_defaults(func=cmd_flash)

    devices = sub.add_parser(
        "devices",
        help="list the devices that answer hello (serial ports, addresses, mDNS)",
        description="Say hello on every serial port (and --port given) and on each --address tcp://host:port; "
        "with zeroconf installed, also on devices advertising _sottovoce._tcp on the local network.",
    )
    devices.add_argument("--port", action="append", default=[], help="extra port URL to try (repeatable)")
    devices.add_argument("--address", action="append", default=[], help="tcp://host:port to try (repeatable)")
    devices.add_argument("--token", help="token for TCP devices (or $SOTTOVOCE_TOKEN)")
    devices.add_argument("--no-scan", action="store_true", help="do not probe the machine's serial ports")
    devices.add_argument("--mdns", action="store_true", help="browse mDNS for devices (needs zeroconf)")
    devices.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each device")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=cmd_devices)


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("SOTTOVOCE_TOKEN") or None


def cmd_flash(args: argparse.Namespace) -> int:
    from edge.errors import ConfigError

    if args.fleet:
        from host.fleet import flash_fleet, print_fleet_table

        results = flash_fleet(args.fleet, args.bundle, activate=args.activate, jobs=args.jobs,
                              default_token=_token(args))
        if args.json:
            print(json.dumps([r.to_dict() for r in results], indent=2))
        else:
            print_fleet_table(results)
        return 0 if all(r.ok for r in results) else 1
    if not args.port:
        raise ConfigError("give --port URL (or --fleet INVENTORY.toml)")
    from host.flash import flash_bundle
    from host.progress import FlashProgress

    with FlashProgress(args.bundle.name, enabled=not args.quiet and not args.json) as bar:
        result = flash_bundle(args.bundle, args.port, token=_token(args), activate=args.activate,
                              force=args.force, progress=bar.update, log=bar.log)
    if args.json:
        print(json.dumps({"ok": True, "slot": result.slot, "bundle_id": result.bundle_id, "sha256": result.sha256,
                          "bytes": result.size, "sent": result.sent_bytes, "seconds": round(result.seconds, 3),
                          "resumed_from": result.resumed_from, "already_installed": result.already_installed,
                          "verdict": result.verdict}))
    else:
        verdict = (f"; slot {result.slot} is active and healthy" if result.verdict
                   else f"; slot {result.slot} pending (not activated)")
        if result.already_installed:
            print(f"{args.bundle.name} was already on {args.port} (slot {result.slot}), nothing sent{verdict}",
                  file=sys.stderr)
        else:
            print(f"flashed {args.bundle.name} to {args.port}: {result.size / 1e6:.1f} MB in {result.seconds:.1f} s "
                  f"({result.mb_per_s:.1f} MB/s){' resumed at ' + str(result.resumed_from) if result.resumed_from else ''}"
                  f"{verdict}", file=sys.stderr)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from edge.errors import ConfigError
    from host.devices import discover

    if args.mdns:
        import importlib.util

        if importlib.util.find_spec("zeroconf") is None:
            raise ConfigError("--mdns needs the zeroconf package (pip install zeroconf)")
    found = discover(ports=args.port, addresses=args.address, token=_token(args), scan_serial=not args.no_scan,
                     mdns=args.mdns, timeout=args.timeout)
    if args.json:
        print(json.dumps([d.to_dict() for d in found], indent=2))
        return 0
    if not found:
        print("no device answered hello", file=sys.stderr)
        return 1
    print(f"{'port':32s} {'board':18s} {'active':7s} {'slots':16s} note")
    for d in found:
        slots = ",".join(f"{k}={v}" for k, v in (d.info.get("slots") or {}).items())
        print(f"{d.url:32s} {str(d.info.get('board', '-')):18s} {str(d.info.get('active', '-')):7s} {slots:16s} "
              f"{d.error or ''}")
    return 0
