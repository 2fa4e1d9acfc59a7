"""A virtual device on this machine: the real edge daemon on a pseudo-terminal, flashed by the real host code.

``sottovoce demo`` uses it to show the whole path (export -> flash over a serial link -> boot ->
health check) without a board.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge.errors import SottovoceError


def _wait_announce(proc: subprocess.Popen, path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            raise SottovoceError(f"virtual device daemon exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SottovoceError("virtual device daemon did not come up within a minute")
        time.sleep(0.05)
    return json.loads(path.read_text())


def flash_virtual_device(svb: Path, root: Path, *, trust: Path | None = None, health_check: str | None = None,
                         quiet: bool = False) -> Path:
    """Start ``sottovoce edge serve --root ROOT --serial pty`` as a subprocess, flash ``svb`` to it over the pty
    with a progress bar, wait for the health verdict, stop the daemon; return the active slot's bundle directory.

    Unsigned bundles are accepted unless ``trust`` (a public key) is given. Raises ``SottovoceError``
    (the flash failure) if the bundle does not land and pass its health check.
    """
    from host.flash import flash_bundle
    from host.progress import FlashProgress

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sottovoce", "edge", "serve", "--root", str(root), "--serial", "pty"]
    cmd += ["--trust", str(trust)] if trust else ["--allow-unsigned"]
    if health_check:
        cmd += ["--health-check", health_check]
    announce = root / "run" / "daemon.json"
    announce.unlink(missing_ok=True)
    log_path = root / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                cwd=Path(__file__).resolve().parents[1], env=dict(os.environ))
    try:
        port = _wait_announce(proc, announce)["serial"]
        with FlashProgress(Path(svb).name, enabled=not quiet) as bar:
            if not quiet:
                bar.log(f"   virtual device: {root} on {port} (daemon pid {proc.pid}, log {log_path})")
            result = flash_bundle(Path(svb), port, progress=bar.update, log=bar.log)
        if not quiet:
            print(f"   flashed {result.size / 1e6:.1f} MB over the pty in {result.seconds:.1f} s "
                  f"({result.mb_per_s:.1f} MB/s); slot {result.slot} healthy", file=sys.stderr, flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    state = json.loads((root / "state.json").read_text())
    if not state.get("active"):
        raise SottovoceError("the virtual device has no good slot after flashing")
    return root / "slots" / state["active"]
