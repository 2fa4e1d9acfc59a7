"""The device daemon: holds the slot store, answers the control protocol, optionally runs the voice loop.

``sottovoce edge serve --root DIR (--serial PATH|pty | --tcp HOST:PORT) [--token T]`` starts it; a
systemd unit does so on a board (``hw/systemd/sottovoce-edge.service``). At start it runs the slot
store's boot procedure (a pending slot is tried once and marked good or bad), then serves:

- serial: one link on a tty (a USB gadget such as ``/dev/ttyGS0``), or ``pty``: a fresh
  pseudo-terminal pair whose other end's path is announced (tests and the virtual device);
- TCP: any number of connections, each authenticated by the pre-shared token in ``hello``.

Flash requests only touch ``incoming/`` and the inactive slot, so they run while the voice loop
serves the active one; ``slot.activate`` stops the loop, tries the new slot, and restarts the loop
on whatever slot is active after the verdict. The daemon announces where it listens in
``ROOT/run/daemon.json`` and on stdout.

Per link, the answers to state-changing requests are cached (a host re-sending a request whose
answer was lost gets the same answer, nothing runs twice), and long requests send ``busy``
heartbeats so the host can tell "working" from "lost".
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge import __version__
from edge.errors import ConfigError, SottovoceError
from edge.framing import FramingError
from edge.protocol import (
    AUTH_SCHEME,
    BUSY,
    FLASH_ABORT,
    FLASH_BEGIN,
    FLASH_CHUNK,
    FLASH_COMMIT,
    HELLO,
    LOG,
    PROTOCOL_VERSION,
    SLOT_ACTIVATE,
    SLOT_ROLLBACK,
    STATUS,
    LinkClosed,
    LinkTimeout,
    Message,
    SerialLink,
    TcpLink,
    check_mac,
    error_message,
    new_challenge,
    validate_request,
)
from edge.slots import SlotStore, atomic_write_json

log = logging.getLogger("sottovoce.daemon")

#: chunk sizes the device suggests per link (bytes of payload per flash.chunk) and the window in flight
LINK_PARAMS = {"tcp": {"chunk": 256 * 1024, "window": 4}, "serial": {"chunk": 4096, "window": 8}}
HEALTH_ENV = "SOTTOVOCE_HEALTH_CHECK"
#: requests whose replies are cached per link, so a re-sent one (same id and fields) is answered, not redone
IDEMPOTENT_BY_CACHE = (FLASH_BEGIN, FLASH_COMMIT, FLASH_ABORT, SLOT_ACTIVATE, SLOT_ROLLBACK)
#: requests that may run for long: the device sends ``busy`` events every ``HEARTBEAT_S`` meanwhile
LONG_REQUESTS = (FLASH_BEGIN, FLASH_COMMIT, SLOT_ACTIVATE, SLOT_ROLLBACK)
HEARTBEAT_S = 1.0
_REPLY_CACHE = 32


class RingLog(logging.Handler):
    """Keeps the last ``size`` log lines for the ``log`` request."""

    def __init__(self, size: int = 500) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class LinkSession:
    """Per-connection state: is the peer authenticated, which challenge it must answer."""

    link: Any
    needs_auth: bool
    authenticated: bool = False
    challenge: str | None = None
    close: bool = False
    replies: "collections.OrderedDict[tuple, Message]" = field(default_factory=collections.OrderedDict)


class VoiceRunner:
    """Runs the voice loop on the active slot's bundle in a thread; restartable after a slot switch."""

    def __init__(self, store: SlotStore, input_spec: str, output_spec: str | None) -> None:
        self.store = store
        self.input_spec = input_spec
        self.output_spec = output_spec
        self.state = "stopped"
        self.error = ""
        self.turns = 0
        self.bundle_id: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        bundle = self.store.active_bundle_dir()
        if bundle is None:
            self.state, self.error = "idle", "no good slot to run"
            return
        self._stop.clear()
        self.state, self.error = "starting", ""
        self._thread = threading.Thread(target=self._run, args=(bundle,), name="voice", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._thread = None
        self.state = "stopped"

    def _source(self):
        from edge.audio_io import RawPcmSource, WavFileSource

        if self.input_spec == "-":
            return RawPcmSource(realtime=True)
        if self.input_spec == "device":
            import edge.audio_io as aio

            cls = getattr(aio, "DeviceSource", None)
            if cls is None:
                raise ConfigError("this runtime has no live audio input backend; give --voice-input FILE.wav")
            return cls()
        return WavFileSource(self.input_spec, realtime=True)

    def _run(self, bundle: Path) -> None:
        from edge.audio_io import NullSink, WavFileSink
        from edge.session import build_session

        try:
            session = build_session(bundle)
            self.bundle_id = session.loaded.manifest.bundle_id
            inner = self._source()
            stop = self._stop

            class Stoppable:
                realtime = True

                def frames(self):
                    for frame in inner.frames():
                        if stop.is_set():
                            return
                        yield frame

                def close(self):
                    inner.close()

            rate = session.stages.tts.sample_rate
            sink = WavFileSink(self.output_spec, sample_rate=rate) if self.output_spec else NullSink(rate)
            self.state = "running"
            log.info("voice loop running on %s", bundle)

            def on_turn(rec) -> None:
                self.turns += 1
                log.info("voice turn %d: %r -> %r", rec.turn, rec.transcript, rec.reply)

            try:
                session.run(Stoppable(), sink, on_turn=on_turn)
            finally:
                sink.close()
            self.state = "finished" if not stop.is_set() else "stopped"
        except Exception as exc:  # noqa: BLE001 - the loop failing must not take the daemon down
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("voice loop failed: %s", self.error)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "turns": self.turns, "bundle_id": self.bundle_id}


@dataclass
class Daemon:
    """Answers protocol requests against one ``SlotStore``; one instance serves every link."""

    store: SlotStore
    token: str | None = None
    board: str = "x86-dev"
    voice: VoiceRunner | None = None
    ring: RingLog = field(default_factory=RingLog)
    stopping: threading.Event = field(default_factory=threading.Event)
    links: list[Any] = field(default_factory=list)
    #: more request handlers (e.g. ``profile.run`` from another module): type -> handler(msg, session) -> reply
    extra_handlers: dict[str, Callable[[Message, LinkSession], Message]] = field(default_factory=dict)

    def handlers(self) -> dict[str, Callable[[Message, LinkSession], Message]]:
        """Request type -> handler; the built-in ones plus ``extra_handlers``."""
        return {
            STATUS: self._status,
            FLASH_BEGIN: self._flash_begin,
            FLASH_CHUNK: self._flash_chunk,
            FLASH_COMMIT: self._flash_commit,
            FLASH_ABORT: self._flash_abort,
            SLOT_ACTIVATE: self._slot_activate,
            SLOT_ROLLBACK: self._slot_rollback,
            LOG: self._log,
            **self.extra_handlers,
        }

    # ------------------------------------------------------------------ dispatch

    def answer(self, msg: Message, session: LinkSession) -> Message:
        """``handle`` plus the link's reliability: a re-sent state-changing request (same type, id and
        fields) gets the cached reply instead of running twice; a long one sends ``busy`` heartbeats."""
        key = None
        if msg.type == HELLO:
            session.replies.clear()  # a new host session: ids from an earlier one must not hit the cache
        if msg.type in IDEMPOTENT_BY_CACHE and msg.id is not None:
            key = (msg.type, msg.id, json.dumps(msg.data, sort_keys=True, default=str))
            cached = session.replies.get(key)
            if cached is not None:
                log.info("re-sent %s (id %s): answering from the reply cache", msg.type, msg.id)
                return cached
        done = threading.Event()
        if msg.type in LONG_REQUESTS and msg.id is not None:
            threading.Thread(target=self._heartbeat, args=(msg, session, done), daemon=True,
                             name=f"busy-{msg.id}").start()
        try:
            reply = self.handle(msg, session)
        finally:
            done.set()
        if key is not None:
            session.replies[key] = reply
            while len(session.replies) > _REPLY_CACHE:
                session.replies.popitem(last=False)
        return reply

    @staticmethod
    def _heartbeat(msg: Message, session: LinkSession, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                session.link.send(Message(BUSY, None, {"request": msg.id, "op": msg.type}))
            except SottovoceError:
                return

    def handle(self, msg: Message, session: LinkSession) -> Message:
        """Answer one request: a reply of the same type and id, or an ``error`` with a stable code."""
        try:
            validate_request(msg)
            if msg.type == HELLO:
                return self._hello(msg, session)
            if session.needs_auth and not session.authenticated:
                return msg.error("auth.required", "authenticate with hello first (TCP needs the device token)")
            handler = self.handlers().get(msg.type)
            if handler is None:
                return msg.error("protocol.unsupported", f"this device does not answer {msg.type!r}")
            return handler(msg, session)
        except SottovoceError as err:
            return msg.error(err.code, str(err))
        except Exception as exc:  # noqa: BLE001 - never let one request kill the link
            log.exception("internal error answering %s", msg.type)
            return msg.error("internal", f"device error while answering {msg.type}: {type(exc).__name__}: {exc}")

    def _device_info(self, session: LinkSession) -> dict[str, Any]:
        st = self.store.read_state()
        params = LINK_PARAMS.get(session.link.kind, LINK_PARAMS["serial"])
        return {
            "version": PROTOCOL_VERSION,
            "software": __version__,
            "board": self.board,
            "active": st.active,
            "pending": st.pending,
            "slots": {s: info.state for s, info in st.slots.items()},
            "capabilities": ["flash", "slots", "log"] + (["voice"] if self.voice else []),
            "chunk": params["chunk"],
            "window": params["window"],
            "authenticated": True,
        }

    def _hello(self, msg: Message, session: LinkSession) -> Message:
        if msg.data["version"] != PROTOCOL_VERSION:
            return msg.error("protocol.version", f"device speaks protocol version {PROTOCOL_VERSION}, "
                             f"host sent {msg.data['version']}; update one of them", version=PROTOCOL_VERSION)
        if session.needs_auth and not session.authenticated:
            mac = msg.data.get("mac")
            if mac is None or session.challenge is None:
                session.challenge = new_challenge()
                return msg.reply({"version": PROTOCOL_VERSION, "auth": AUTH_SCHEME, "challenge": session.challenge,
                                  "authenticated": False})
            if not check_mac(self.token or "", session.challenge, mac):
                log.warning("refused %s client %s: wrong token", session.link.kind, session.link.peer)
                session.close = True
                return msg.error("auth.refused", "wrong token: the device refused the connection")
            session.authenticated = True
            log.info("%s client %s authenticated", session.link.kind, session.link.peer)
        return msg.reply(self._device_info(session))

    def _status(self, msg: Message, session: LinkSession) -> Message:
        data = self.store.status()
        data["board"] = self.board
        data["link"] = {"kind": session.link.kind, "bad_frames": getattr(session.link, "bad_frames", 0)}
        data["bad_frames_total"] = sum(getattr(link, "bad_frames", 0) for link in list(self.links))
        data["voice"] = self.voice.status() if self.voice else None
        return msg.reply(data)

    def _flash_begin(self, msg: Message, session: LinkSession) -> Message:
        d = msg.data
        params = LINK_PARAMS.get(session.link.kind, LINK_PARAMS["serial"])
        installed = None if d.get("force") else self.store.installed_slot(d["sha256"])
        if installed is not None:  # it already landed (e.g. the commit reply was lost): nothing to send
            return msg.reply({"offset": d["size"], "installed": installed, "chunk": params["chunk"],
                              "window": params["window"]})
        offset = self.store.begin(d["size"], d["sha256"], str(d.get("bundle_id", "")))
        return msg.reply({"offset": offset, "chunk": params["chunk"], "window": params["window"]})

    def _flash_chunk(self, msg: Message, session: LinkSession) -> Message:
        try:
            nxt = self.store.write(msg.data["offset"], msg.payload)
        except SottovoceError as err:
            t = self.store.transfer
            return msg.error(err.code, str(err), expected=t.offset if t else None)
        return msg.reply({"offset": nxt})

    def _flash_commit(self, msg: Message, session: LinkSession) -> Message:
        sha = msg.data.get("sha256")
        result = self.store.commit(sha if isinstance(sha, str) else None)
        return msg.reply({"slot": result.slot, "bundle_id": result.bundle_id, "sha256": result.sha256,
                          "signed_by": result.signed_by, "state": "pending"})

    def _flash_abort(self, msg: Message, session: LinkSession) -> Message:
        self.store.abort()
        return msg.reply({"aborted": True})

    def _slot_activate(self, msg: Message, session: LinkSession) -> Message:
        if self.voice:
            self.voice.stop()
        try:
            verdict = self.store.activate(msg.data.get("slot"))
        finally:
            if self.voice:
                self.voice.start()
        if verdict.get("verdict") == "bad":
            return msg.error("slot.health", f"slot {verdict['tried']} failed its health check and the device "
                             f"stayed on slot {verdict['active']}: {verdict['reason']}", verdict=verdict)
        return msg.reply(verdict)

    def _slot_rollback(self, msg: Message, session: LinkSession) -> Message:
        if self.voice:
            self.voice.stop()
        try:
            st = self.store.rollback()
        finally:
            if self.voice:
                self.voice.start()
        return msg.reply({"active": st.active, "previous": st.previous})

    def _log(self, msg: Message, session: LinkSession) -> Message:
        n = msg.data.get("lines", 100)
        n = n if isinstance(n, int) and 0 < n <= 500 else 100
        return msg.reply({"lines": list(self.ring.lines)[-n:]})

    # ------------------------------------------------------------------ links

    def serve_link(self, link: Any, *, needs_auth: bool) -> None:
        """Answer requests on ``link`` until it drops, the peer is refused, or the daemon stops."""
        session = LinkSession(link, needs_auth)
        self.links.append(link)
        try:
            while not self.stopping.is_set() and not session.close:
                try:
                    msg = link.recv(timeout=0.5)
                except LinkTimeout:
                    continue
                except FramingError as exc:
                    if link.kind == "tcp":
                        log.warning("dropping TCP client %s: %s", link.peer, exc)
                        return
                    continue
                if msg.id is None:
                    continue  # an event from the host: nothing to answer
                link.send(self.answer(msg, session))
        except LinkClosed as exc:
            log.info("link %s closed: %s", getattr(link, "peer", "?"), exc)
        finally:
            if link in self.links and link.kind == "tcp":
                self.links.remove(link)

    def serve_tcp(self, host: str, port: int) -> tuple[socket.socket, str]:
        """Listen on ``host:port`` (0 = any free port); return the socket and the address it listens on."""
        srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(8)
        srv.settimeout(0.5)
        addr = f"{host}:{srv.getsockname()[1]}"

        def accept_loop() -> None:
            while not self.stopping.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                conn.settimeout(None)
                link = TcpLink(conn)
                threading.Thread(target=self._serve_and_close, args=(link,), daemon=True,
                                 name=f"tcp-{link.peer}").start()

        threading.Thread(target=accept_loop, name="tcp-accept", daemon=True).start()
        return srv, addr

    def _serve_and_close(self, link: TcpLink) -> None:
        try:
            self.serve_link(link, needs_auth=True)
        finally:
            link.close()

    def open_serial(self, spec: str) -> tuple[int, str, int | None]:
        """Open the serial side: ``pty`` makes a pseudo-terminal pair (returns the master fd and the
        slave's path; the slave stays open here so a host closing it never hangs up the link);
        a path opens that tty raw."""
        if spec == "pty":
            master, slave = os.openpty()
            tty.setraw(master)
            tty.setraw(slave)
            return master, os.ttyname(slave), slave
        fd = os.open(spec, os.O_RDWR | os.O_NOCTTY)
        if os.isatty(fd):
            tty.setraw(fd)
        return fd, spec, None

    def serial_loop(self, fd: int, path: str, spec: str) -> None:
        """Serve the serial link; a tty that goes away (USB unplugged) is reopened until the daemon stops."""
        while not self.stopping.is_set():
            link = SerialLink(fd, name=path)
            self.serve_link(link, needs_auth=False)
            if self.stopping.is_set() or spec == "pty":
                if spec == "pty" and not self.stopping.is_set():
                    continue  # a pty master never really closes while we hold the slave
                return
            try:
                os.close(fd)
            except OSError:
                pass
            while not self.stopping.is_set():
                try:
                    fd, path, _ = self.open_serial(spec)
                    break
                except OSError:
                    time.sleep(1.0)


def load_health_check(spec: str | None) -> Callable[[Path], dict] | None:
    """``module:function`` -> the function (None keeps the default, ``edge.runtime.health_check``)."""
    if not spec:
        return None
    module, _, func = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"health check {spec!r} cannot be loaded: {exc}") from exc


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(
    root: Path,
    *,
    serial: str | None = None,
    tcp: str | None = None,
    token: str | None = None,
    allow_unsigned: bool = False,
    trust: list[Path] | None = None,
    health_check: str | None = None,
    quota: int | None = None,
    board: str | None = None,
    voice: bool = False,
    voice_input: str = "device",
    voice_output: str | None = None,
    mdns: bool = True,
) -> int:
    """Run the daemon until SIGTERM/SIGINT: boot the slot store, then serve the links (a TCP port is
    announced over mDNS unless ``mdns`` is False or zeroconf is absent). Returns the exit code."""
    from edge.bundle import load_public_key

    if not serial and not tcp:
        raise ConfigError("give --serial PATH (or pty) and/or --tcp HOST:PORT")
    if tcp and not token:
        raise ConfigError("TCP needs a pre-shared token: give --token, --token-file or $SOTTOVOCE_TOKEN")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ring = RingLog()
    logging.getLogger("sottovoce").addHandler(ring)
    logging.getLogger("sottovoce").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = [load_public_key(p) for p in trust or []]
    check = load_health_check(health_check or os.environ.get(HEALTH_ENV))
    store = SlotStore(root, public_keys=keys, allow_unsigned=allow_unsigned, health_check=check, quota=quota,
                      board=board)
    verdict = store.boot()
    log.info("boot: %s", verdict)
    runner = VoiceRunner(store, voice_input, voice_output) if voice else None
    daemon = Daemon(store, token=token, board=board or "x86-dev", voice=runner, ring=ring)

    def stop(signum, frame) -> None:  # noqa: ARG001
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    announce: dict[str, Any] = {"pid": os.getpid(), "root": str(root)}
    threads: list[threading.Thread] = []
    srv = None
    mdns_entry = None
    if tcp:
        host, port = parse_host_port(tcp)
        srv, addr = daemon.serve_tcp(host, port)
        announce["tcp"] = addr
        if mdns:
            from edge.mdns import announce as mdns_announce

            bound_host, _, bound_port = addr.rpartition(":")
            txt = {"board": board or "x86-dev", "protocol": str(PROTOCOL_VERSION), "version": __version__}
            mdns_entry = mdns_announce(f"{socket.gethostname()}-{bound_port}", bound_host, int(bound_port), txt)
    if serial:
        fd, path, _keep = daemon.open_serial(serial)
        announce["serial"] = path
        t = threading.Thread(target=daemon.serial_loop, args=(fd, path, serial), name="serial", daemon=True)
        t.start()
        threads.append(t)
    if runner:
        runner.start()
    (root / "run").mkdir(exist_ok=True)
    atomic_write_json(root / "run" / "daemon.json", announce)
    print("sottovoce edge: " + json.dumps(announce), flush=True)
    if "serial" in announce:
        log.info("flash it with: sottovoce flash BUNDLE.svb --port %s", announce["serial"])
    if "tcp" in announce:
        log.info("flash it with: sottovoce flash BUNDLE.svb --port tcp://%s --token …", announce["tcp"])
    log.info("serving %s", announce)
    while not daemon.stopping.wait(0.5):
        pass
    log.info("stopping")
    if runner:
        runner.stop()
    if srv is not None:
        srv.close()
    if mdns_entry is not None:
        mdns_entry.close()
    (root / "run" / "daemon.json").unlink(missing_ok=True)
    return 0
