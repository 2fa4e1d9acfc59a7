"""``sottovoce flash --fleet inventory.toml``: flash N devices concurrently, one result row per device.

Inventory::

    [defaults]            # optional
    token = "..."         # or token_env = "SOTTOVOCE_TOKEN"
    bundle = "dist/rpi5.svb"

    [[device]]
    name = "kitchen"
    port = "tcp://10.0.0.21:7700"
    token = "..."         # optional, per device
    bundle = "dist/x86-dev.svb"   # optional, per device

A failure on one device is recorded in its row and never stops the others.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.errors import ConfigError


@dataclass
class FleetEntry:
    name: str
    port: str
    bundle: Path
    token: str | None


@dataclass
class FleetResult:
    """One device's outcome."""

    name: str
    port: str
    ok: bool
    slot: str | None = None
    seconds: float = 0.0
    mb_per_s: float = 0.0
    verdict: str | None = None
    error: str | None = None
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_inventory(path: Path, bundle: Path | None, default_token: str | None = None) -> list[FleetEntry]:
    """Parse the inventory; each device gets its own bundle/token or the defaults."""
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"inventory {path} cannot be read: {exc}") from exc
    defaults = data.get("defaults", {})
    devices = data.get("device", [])
    if not devices:
        raise ConfigError(f"inventory {path} lists no [[device]]")
    base = Path(path).parent

    def token_of(d: dict) -> str | None:
        if d.get("token"):
            return str(d["token"])
        env = d.get("token_env")
        return os.environ.get(env) if env else None

    out = []
    for i, d in enumerate(devices):
        if "port" not in d:
            raise ConfigError(f"inventory {path}: device #{i + 1} has no port")
        b = d.get("bundle") or defaults.get("bundle")
        the_bundle = (base / b) if b else bundle
        if the_bundle is None:
            raise ConfigError(f"inventory {path}: device {d.get('name', i + 1)} has no bundle")
        out.append(FleetEntry(str(d.get("name", d["port"])), str(d["port"]), Path(the_bundle),
                              token_of(d) or token_of(defaults) or default_token))
    return out


def _flash_one(entry: FleetEntry, activate: bool) -> FleetResult:
    from host.flash import flash_bundle

    t0 = time.monotonic()
    try:
        r = flash_bundle(entry.bundle, entry.port, token=entry.token, activate=activate)
        verdict = (r.verdict or {}).get("verdict") if activate else "pending"
        return FleetResult(entry.name, entry.port, True, r.slot, r.seconds, r.mb_per_s, verdict)
    except Exception as exc:  # noqa: BLE001 - one device's failure is its row, never the fleet's
        return FleetResult(entry.name, entry.port, False, seconds=time.monotonic() - t0,
                           error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                           code=getattr(exc, "code", "error"))


def flash_fleet(inventory: Path, bundle: Path | None, *, activate: bool = True, jobs: int = 8,
                default_token: str | None = None) -> list[FleetResult]:
    """Flash every device of the inventory, ``jobs`` at a time; results in inventory order."""
    entries = read_inventory(inventory, bundle, default_token)
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(entries)))) as pool:
        return list(pool.map(lambda e: _flash_one(e, activate), entries))


def print_fleet_table(results: list[FleetResult]) -> None:
    """The per-device result table (rich), on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet: {sum(r.ok for r in results)}/{len(results)} devices flashed")
    for col in ("device", "port", "result", "slot", "time", "MB/s", "reason"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.port, "[green]ok[/]" if r.ok else "[red]FAILED[/]", r.slot or "-",
                      f"{r.seconds:.1f} s", f"{r.mb_per_s:.1f}" if r.ok else "-",
                      (r.verdict or "") if r.ok else f"{r.error} [{r.code}]")
    Console(file=sys.stdout, width=160).print(table)
