"""Helpers for the device-link tests: small real bundles, a fast health check, a daemon subprocess, fault proxies.

The daemon under test is always the real ``sottovoce edge serve`` process; only the health check is
swapped (``--health-check tests.flash_support:health_check``) so that tests do not load real models:
it reads every model file back, and fails when a stage's config says ``"health": "fail"`` (a bundle
whose models do not work), which is what the rollback tests flash.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Callable

from edge.bundle import FORMAT_VERSION, Manifest, StageSpec, file_entry, pack_bundle, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
HEALTH = "tests.flash_support:health_check"
HEALTH_DELAY_ENV = "SOTTOVOCE_TEST_HEALTH_DELAY"


def _die_with_parent() -> None:
    """In the daemon child: get SIGTERM when the test process dies, so no daemon outlives its test."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def health_check(bundle_dir: Path) -> dict:
    """Test health check: every model file reads back at its manifest size; ``health: fail`` fails it."""
    from edge.runtime import HealthCheckError

    manifest = read_manifest(Path(bundle_dir))
    for name, spec in manifest.stages.items():
        for entry in spec.files:
            if len((Path(bundle_dir) / entry.path).read_bytes()) != entry.size:
                raise HealthCheckError(f"health check failed: {entry.path} does not load")
        if spec.config.get("health") == "fail":
            raise HealthCheckError(f"health check failed: the {name} model produced no output")
    time.sleep(float(os.environ.get(HEALTH_DELAY_ENV, "0")))  # a slow board loading big models
    return {"stages": sorted(manifest.stages)}


def make_svb(tmp: Path, name: str, *, size: int = 64 * 1024, seed: int = 0, fail_health: bool = False,
             key: Path | None = None) -> Path:
    """A well-formed bundle of about ``size`` bytes of pseudo-random model data, packed to ``tmp/name.svb``."""
    import random

    from export.signing import load_private_key, sign_manifest

    rng = random.Random(seed)
    root = tmp / name
    root.mkdir(parents=True, exist_ok=True)
    stages = {}
    for i, stage in enumerate(("vad", "asr", "llm", "tts")):
        (root / stage).mkdir(exist_ok=True)
        (root / stage / "model.onnx").write_bytes(rng.randbytes(max(16, size // 4)) + bytes([i]))
        config = {"health": "fail"} if (fail_health and stage == "llm") else {}
        stages[stage] = StageSpec(kind="test", runtime="onnxruntime", files=[file_entry(root, f"{stage}/model.onnx")],
                                  config=config)
    m = Manifest(format=FORMAT_VERSION, bundle_id="", created="2026-01-01T00:00:00Z", target={"name": "x86-dev"},
                 toolchain={}, stages=stages, version=name)
    m.bundle_id = m.compute_bundle_id()
    if key:
        sign_manifest(m, load_private_key(key))
    write_manifest(root, m)
    return pack_bundle(root, tmp / f"{name}.svb")


class Daemon:
    """``sottovoce edge serve`` as a real subprocess; ``port_url`` is what ``sottovoce flash --port`` takes."""

    def __init__(self, root: Path, *, link: str = "serial", token: str = "s3cret", extra: list[str] | None = None,
                 env: dict[str, str] | None = None, allow_unsigned: bool = True, mdns: bool = False) -> None:
        self.root = Path(root)
        self.link = link
        self.token = token
        cmd = [sys.executable, "-m", "sottovoce", "edge", "serve", "--root", str(self.root),
               "--health-check", HEALTH] + (["--allow-unsigned"] if allow_unsigned else []) + (extra or [])
        if link == "serial":
            cmd += ["--serial", "pty"]
        else:
            cmd += ["--tcp", "127.0.0.1:0", "--token", token] + ([] if mdns else ["--no-mdns"])
        announce = self.root / "run" / "daemon.json"
        announce.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root.parent / f"{self.root.name}-daemon.log"
        with open(self.log_path, "ab") as log:  # a file, not a pipe nobody reads (a full pipe would block it)
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                         stderr=log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while not announce.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("daemon did not announce itself within 30 s")
            time.sleep(0.02)
        self.info = json.loads(announce.read_text())
        self.port_url = self.info["serial"] if link == "serial" else f"tcp://{self.info['tcp']}"

    def wait_dead(self, timeout: float = 30) -> int:
        """Wait for the process to end (a crash point kills it); return its status."""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def state(root: Path) -> dict:
    return json.loads((Path(root) / "state.json").read_text())


class TcpFaultProxy:
    """A real TCP relay on 127.0.0.1 between host and daemon; ``fault(direction, data) -> bytes | None``
    may change the bytes in flight, or return None to cut the connection there."""

    def __init__(self, target: tuple[str, int], fault: Callable[[str, bytes], bytes | None]) -> None:
        self.target = target
        self.fault = fault
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.srv.getsockname()[1]}"
        self.upstream_bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(65536):
                out = self.fault(direction, data)
                if out is None:
                    break
                if direction == "up":
                    self.upstream_bytes += len(data)
                dst.sendall(out)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.srv.close()


class PtyFaultBridge:
    """Two real pseudo-terminals back to back: the host opens ``path``; bytes are relayed to the daemon's
    pty through ``fault(direction, data) -> bytes`` (which may flip bits or drop bytes)."""

    def __init__(self, device_path: str, fault: Callable[[str, bytes], bytes]) -> None:
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self._slave = slave
        self.path = os.ttyname(slave)
        self.dev = os.open(device_path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.dev)
        self.fault = fault
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop:
            r, _, _ = select.select([self.master, self.dev], [], [], 0.1)
            for fd in r:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    continue
                direction = "up" if fd == self.master else "down"
                out = self.fault(direction, data)
                if out:
                    os.write(self.dev if fd == self.master else self.master, out)

    def close(self) -> None:
        self._stop = True
        time.sleep(0.15)
        for fd in (self.master, self._slave, self.dev):
            try:
                os.close(fd)
            except OSError:
                pass


class Ser2Net:
    """What ser2net does for a board's UART: a TCP port on 127.0.0.1 relaying raw bytes to a tty
    (here the daemon's pty), so the host reaches it with the pyserial URL ``socket://127.0.0.1:PORT``."""

    def __init__(self, tty_path: str) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.srv.getsockname()[1]}"
        self.tty_path = tty_path
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
            tty.setraw(fd)
            try:
                while True:
                    r, _, _ = select.select([conn, fd], [], [], 0.2)
                    if conn in r:
                        data = conn.recv(65536)
                        if not data:
                            break
                        os.write(fd, data)
                    if fd in r:
                        conn.sendall(os.read(fd, 65536))
            except OSError:
                pass
            finally:
                os.close(fd)
                conn.close()

    def close(self) -> None:
        self.srv.close()
