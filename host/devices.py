"""``sottovoce devices``: find what answers ``hello`` on serial ports, given addresses and (optionally) mDNS."""

from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.errors import SottovoceError

MDNS_SERVICE = "_sottovoce._tcp.local."


@dataclass
class FoundDevice:
    """One port that was probed: the device's ``hello`` info, or why it did not answer usefully."""

    url: str
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serial_ports() -> list[str]:
    """Serial ports on this machine that could be a board: USB CDC-ACM / USB serial adapters."""
    ports: set[str] = set()
    try:
        from serial.tools import list_ports

        for p in list_ports.comports():
            if p.device and ("ACM" in p.device or "USB" in p.device or p.vid is not None):
                ports.add(p.device)
    except Exception:  # noqa: BLE001 - listing is best effort
        pass
    ports.update(glob.glob("/dev/ttyACM*"))
    ports.update(glob.glob("/dev/serial/by-id/*sottovoce*"))
    return sorted(ports)


def probe(url: str, token: str | None, timeout: float) -> FoundDevice:
    """Say hello on ``url``; a device that asks for a token we lack is still reported (with the reason)."""
    from host.flash import DeviceClient, open_link

    try:
        client = DeviceClient(open_link(url, timeout), url)
    except SottovoceError as exc:
        return FoundDevice(url, error=str(exc))
    try:
        try:
            return FoundDevice(url, client.hello(token))
        except SottovoceError as exc:
            if exc.code == "auth.refused" or "requires a token" in str(exc):
                return FoundDevice(url, {"authenticated": False}, error=str(exc))
            raise
    except SottovoceError as exc:
        return FoundDevice(url, error=str(exc))
    finally:
        client.close()


def mdns_addresses(wait_s: float = 2.0) -> list[str]:
    """``tcp://host:port`` of devices advertising ``_sottovoce._tcp`` (empty when zeroconf is not installed)."""
    try:
        from zeroconf import ServiceBrowser, Zeroconf
    except ImportError:
        return []
    import time

    found: list[str] = []
    zc = Zeroconf()

    class Listener:
        def add_service(self, zc_, type_, name):  # noqa: ANN001
            info = zc_.get_service_info(type_, name)
            if info:
                for addr in info.parsed_addresses():
                    found.append(f"tcp://{addr}:{info.port}")

        def update_service(self, *a):  # noqa: ANN002
            pass

        def remove_service(self, *a):  # noqa: ANN002
            pass

    try:
        ServiceBrowser(zc, MDNS_SERVICE, Listener())
        time.sleep(wait_s)
    finally:
        zc.close()
    return sorted(set(found))


def discover(*, ports: list[str] = (), addresses: list[str] = (), token: str | None = None,  # type: ignore[assignment]
             scan_serial: bool = True, mdns: bool = False, timeout: float = 2.0) -> list[FoundDevice]:
    """Probe every candidate concurrently; return those that answered ``hello`` (or asked for a token)."""
    urls = list(dict.fromkeys([*(serial_ports() if scan_serial else []), *ports, *addresses,
                               *(mdns_addresses() if mdns else [])]))
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        results = list(pool.map(lambda u: probe(u, token, timeout), urls))
    return [r for r in results if r.info]
