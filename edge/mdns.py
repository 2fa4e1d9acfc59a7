"""Announcing a daemon's TCP port on the local network over mDNS/DNS-SD (``_sottovoce._tcp``).

``zeroconf`` comes with the ``edge`` extra; without it (a hand-made install), or when the network
refuses multicast, the daemon serves as before and ``announce`` says why in the log. Hosts find announced
devices with ``sottovoce devices --mdns``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

SERVICE = "_sottovoce._tcp.local."
log = logging.getLogger("sottovoce.mdns")


class Announcement:
    """A registered ``_sottovoce._tcp`` service; ``close`` withdraws it."""

    def __init__(self, zc: Any, info: Any) -> None:
        self._zc, self._info = zc, info

    def close(self) -> None:
        """Unregister the service and stop zeroconf (idempotent)."""
        if self._zc is None:
            return
        try:
            self._zc.unregister_service(self._info)
        finally:
            self._zc.close()
            self._zc = None


def _addresses(host: str) -> list[str]:
    """The IPv4 addresses to advertise for a socket bound to ``host`` (all interfaces: every local one)."""
    if host not in ("0.0.0.0", ""):
        return [host]
    try:
        import ifaddr  # a zeroconf dependency

        return sorted({ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                       if isinstance(ip.ip, str) and not ip.ip.startswith("169.254.")})
    except ImportError:
        return ["127.0.0.1"]


def announce(name: str, host: str, port: int, properties: dict[str, str]) -> Announcement | None:
    """Register ``name._sottovoce._tcp.local.`` for ``host:port`` with TXT ``properties``; returns the
    announcement, or None (logged) when zeroconf is not installed or registration fails."""
    try:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf
    except ImportError:
        log.info("mDNS announce skipped: zeroconf is not installed (pip install zeroconf)")
        return None
    label = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:63] or "sottovoce"
    addrs = _addresses(host)
    info = ServiceInfo(SERVICE, f"{label}.{SERVICE}", port=port, properties=properties, server=f"{label}.local.",
                       addresses=[socket.inet_aton(a) for a in addrs])
    zc = None
    try:
        zc = Zeroconf(ip_version=IPVersion.V4Only)
        zc.register_service(info, allow_name_change=True)
    except Exception as exc:  # noqa: BLE001 - no multicast route, address in use, ...
        if zc is not None:
            zc.close()
        log.warning("mDNS announce failed (%s); find this device by address instead", exc)
        return None
    log.info("announced %s on %s port %d over mDNS", info.name, ", ".join(addrs), port)
    return Announcement(zc, info)
