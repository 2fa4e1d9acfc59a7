"""Flash benchmark: TCP loopback throughput and serial framing efficiency over a real pseudo-terminal.

    .venv/bin/python -m bench.flash [--mb 256] [--serial-mb 32] [--bundle dist/x86-dev.svb]

Both links go to a real ``sottovoce edge serve`` subprocess (health check: the fast test one,
so the figures are the link's, not the models'). Targets: >= 50 MB/s on TCP loopback,
>= 95 % serial efficiency (bundle bytes / bytes on the wire, both directions, acks included).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's packages before bench/ (bench/export.py is not export/)

TCP_TARGET_MB_S = 50.0
SERIAL_TARGET = 0.95


def run(svb: Path, link: str, root: Path) -> dict:
    from host.flash import flash_bundle
    from tests.flash_support import Daemon

    d = Daemon(root, link=link)
    try:
        r = flash_bundle(svb, d.port_url, token=d.token if link == "tcp" else None, activate=False)
    finally:
        d.stop()
    wire = r.wire_bytes_out + r.wire_bytes_in
    return {"link": link, "bytes": r.size, "transfer_s": r.transfer_seconds, "total_s": r.seconds,
            "transfer_mb_s": r.size / 1e6 / r.transfer_seconds, "total_mb_s": r.size / 1e6 / r.seconds,
            "wire": wire, "efficiency": r.size / wire}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="synthetic bundle size for TCP (MB)")
    ap.add_argument("--serial-mb", type=int, default=32, help="synthetic bundle size for the pty (MB)")
    ap.add_argument("--bundle", type=Path, help="also measure this real bundle on both links")
    args = ap.parse_args()
    from tests.flash_support import make_svb

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-flash-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        cases = [("synthetic", make_svb(tmp, "tcp", size=args.mb * 1_000_000), "tcp"),
                 ("synthetic", make_svb(tmp, "ser", size=args.serial_mb * 1_000_000, seed=1), "serial")]
        if args.bundle:
            cases += [(args.bundle.name, args.bundle, "tcp"), (args.bundle.name, args.bundle, "serial")]
        print(f"(bundles built in {time.monotonic() - t0:.1f} s)")
        for i, (name, svb, link) in enumerate(cases):
            row = run(svb, link, tmp / f"dev{i}")
            row["bundle"] = name
            rows.append(row)
    print(f"{'link':7s} {'bundle':16s} {'MB':>8s} {'transfer MB/s':>14s} {'incl. commit':>13s} {'efficiency':>11s}")
    for r in rows:
        print(f"{r['link']:7s} {r['bundle'][:16]:16s} {r['bytes'] / 1e6:8.1f} {r['transfer_mb_s']:14.1f} "
              f"{r['total_mb_s']:13.1f} {100 * r['efficiency']:10.2f}%")
    tcp = min(r["transfer_mb_s"] for r in rows if r["link"] == "tcp")
    eff = min(r["efficiency"] for r in rows if r["link"] == "serial")
    print(f"TCP loopback {tcp:.1f} MB/s (target >= {TCP_TARGET_MB_S:.0f}): {'PASS' if tcp >= TCP_TARGET_MB_S else 'FAIL'}")
    print(f"serial efficiency {100 * eff:.2f} % (target >= {100 * SERIAL_TARGET:.0f} %): "
          f"{'PASS' if eff >= SERIAL_TARGET else 'FAIL'}")
    return 0 if tcp >= TCP_TARGET_MB_S and eff >= SERIAL_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
