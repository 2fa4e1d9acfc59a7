"""Flash a bundle to a device over the control protocol (``sottovoce flash``).

The host sends ``flash.begin`` (size, sha256) and continues from the offset the device answers
(0, or where an earlier, interrupted run stopped), streams ``flash.chunk``s with a small window in
flight (large chunks on TCP, ~4 KiB frames on serial), rewinds when the device reports a gap,
reconnects a bounded number of times when the link drops, then ``flash.commit``: the device
answers with the sha256 it computed, which must equal the host's (verify-after-write). With
``activate`` the device then boots the new slot and answers the health verdict.

Slow requests (begin, commit, activate) wait as long as the device sends ``busy`` heartbeats; a
request or answer lost on the line is re-sent with the same id after a few silent seconds (the
device answers repeats from its reply cache). A bundle the device already holds is not sent again.
"""

from __future__ import annotations

import collections
import hashlib
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.bundle import read_packed_manifest
from edge.errors import SottovoceError
from edge.protocol import (
    BUSY,
    FLASH_BEGIN,
    FLASH_CHUNK,
    FLASH_COMMIT,
    HELLO,
    PROTOCOL_VERSION,
    SLOT_ACTIVATE,
    STATUS,
    AuthError,
    Link,
    LinkClosed,
    LinkTimeout,
    Message,
    RemoteError,
    SerialLink,
    TcpLink,
    auth_mac,
)

Progress = Callable[[int, int], None]
#: seconds without an answer or a ``busy`` heartbeat after which a slow request counts as lost (per link)
IDLE_S = {"tcp": 15.0, "serial": 3.0}


class FlashFailed(SottovoceError):
    """Flashing a device failed; the message says why in one line."""

    code = "flash.failed"


class ReplyLost(SottovoceError):
    """A later reply arrived first: the device never answered this request (its frame was lost)."""

    code = "link.lost"


def open_link(url: str, timeout: float = 5.0) -> Link:
    """Open ``tcp://host:port`` as a TCP link, anything else as a pyserial URL (``/dev/ttyACM0``, ``socket://h:p``)."""
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except (OSError, ValueError) as exc:
            raise LinkClosed(f"cannot connect to {url}: {exc}") from exc
        return TcpLink(sock)
    import serial

    try:
        port = serial.serial_for_url(url, baudrate=921600, timeout=0.1, write_timeout=30)
    except (serial.SerialException, ValueError) as exc:
        raise LinkClosed(f"cannot open {url}: {exc}") from exc
    try:
        port.reset_input_buffer()
    except Exception:  # noqa: BLE001 - socket:// ports may not support it
        pass
    return SerialLink(port, name=url)


class DeviceClient:
    """Requests over one link: ``request`` waits for the answer; ``send``/``wait`` pipeline several;
    ``call`` re-sends a request (same id) whose answer never came while the device showed no sign of work."""

    def __init__(self, link: Link, url: str = "") -> None:
        self.link = link
        self.url = url
        self._next = random.randint(1, 1 << 20)  # short ids: fewer header bytes per serial frame
        self._early: dict[int, Message] = {}
        self.info: dict[str, Any] = {}

    def send(self, type_: str, data: dict[str, Any] | None = None, payload: bytes = b"",
             mid: int | None = None) -> int:
        """Send one request (a fresh id, or ``mid`` to re-send one); return its id."""
        if mid is None:
            mid = self._next
            self._next += 1
        self.link.send(Message(type_, mid, data or {}, payload))
        return mid

    def wait(self, mid: int, timeout: float = 10.0, *, idle: float | None = None) -> Message:
        """The answer to request ``mid``; ``RemoteError`` if it is an ``error``, ``ReplyLost`` if a later one came first.

        ``LinkTimeout`` after ``timeout`` seconds, or sooner: after ``idle`` seconds without a
        ``busy`` heartbeat for ``mid`` (the request or its answer was lost; the caller may re-send).
        """
        now = time.monotonic()
        deadline = now + timeout
        quiet_until = deadline if idle is None else min(deadline, now + idle)
        while mid not in self._early:
            if any(k > mid for k in self._early):
                raise ReplyLost(f"request {mid} got no answer (frame lost on the link)")
            msg = self.link.recv(timeout=max(0.01, quiet_until - time.monotonic()))
            if msg.type == BUSY and msg.id is None:
                if msg.data.get("request") == mid and idle is not None:
                    quiet_until = min(deadline, time.monotonic() + idle)
                continue
            if msg.id is None or msg.id < mid - (1 << 20):
                continue  # an event, or stale bytes from an earlier session
            self._early[msg.id] = msg
        msg = self._early.pop(mid)
        for k in [k for k in self._early if k < mid]:
            del self._early[k]
        if msg.type == "error":
            raise RemoteError(str(msg.data.get("code", "error")), str(msg.data.get("message", "device error")),
                              msg.data)
        return msg

    def request(self, type_: str, data: dict[str, Any] | None = None, payload: bytes = b"",
                timeout: float = 10.0) -> Message:
        return self.wait(self.send(type_, data, payload), timeout)

    def hello(self, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
        """Say hello (answering the HMAC challenge with ``token`` when the device asks); return the device info."""
        reply = self.request(HELLO, {"version": PROTOCOL_VERSION, "client": "sottovoce-host"}, timeout=timeout)
        if reply.data.get("authenticated") is False:
            challenge = str(reply.data.get("challenge", ""))
            if not token:
                raise AuthError(f"{self.url} requires a token (give --token)")
            try:
                reply = self.request(HELLO, {"version": PROTOCOL_VERSION, "client": "sottovoce-host",
                                             "challenge": challenge, "mac": auth_mac(token, challenge)},
                                    timeout=timeout)
            except RemoteError as exc:
                raise AuthError(f"{self.url} refused the token: {exc}") from exc
        self.info = dict(reply.data)
        return self.info

    def status(self) -> dict[str, Any]:
        return dict(self.request(STATUS).data)

    def close(self) -> None:
        self.link.close()


def connect(url: str, token: str | None = None, timeout: float = 2.0) -> DeviceClient:
    """Open the link and say hello; the client is ready for requests."""
    client = DeviceClient(open_link(url, timeout), url)
    try:
        for attempt in range(3):
            try:
                client.hello(token, timeout)
                return client
            except (LinkTimeout, ReplyLost):
                if attempt == 2:
                    raise
    except BaseException:
        client.close()
        raise
    return client


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FlashResult:
    """What a successful flash did."""

    url: str
    bundle_id: str
    slot: str
    sha256: str
    size: int
    sent_bytes: int
    seconds: float
    resumed_from: int
    verdict: dict[str, Any] | None = None
    reconnects: int = 0
    notes: list[str] = field(default_factory=list)
    #: bytes that crossed the link for the transfer (framing, headers, acks, resends included)
    wire_bytes_out: int = 0
    wire_bytes_in: int = 0
    transfer_seconds: float = 0.0
    #: the device already held this bundle (an earlier run landed it): nothing was sent
    already_installed: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.sent_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _send_chunks(client: DeviceClient, fh, size: int, start: int, chunk: int, window: int,
                 progress: Progress | None, reply_timeout: float) -> int:
    """Stream ``[start, size)`` with ``window`` chunks in flight; return the bytes sent (resends included).

    The device answers each chunk with the next offset it expects; a gap (lost or reordered chunk)
    comes back as ``flash.offset`` with ``expected``: the host drains what is in flight and
    rewinds there. A missing reply followed by a later one is skipped (the later one tells).
    """
    offset = start  # next byte to send
    acked = start  # the device's latest reported offset
    sent = 0
    inflight: collections.deque[int] = collections.deque()
    while acked < size:
        while offset < size and len(inflight) < window:
            fh.seek(offset)
            data = fh.read(min(chunk, size - offset))
            inflight.append(client.send(FLASH_CHUNK, {"offset": offset}, data))
            offset += len(data)
            sent += len(data)
        if not inflight:
            offset = acked
            continue
        try:
            acked = int(client.wait(inflight.popleft(), reply_timeout).data["offset"])
        except ReplyLost:
            continue
        except RemoteError as exc:
            if exc.code != "flash.offset" or exc.data.get("expected") is None:
                raise
            acked = int(exc.data["expected"])
            while inflight:
                try:
                    acked = int(client.wait(inflight.popleft(), reply_timeout).data["offset"])
                except RemoteError as later:
                    if later.data.get("expected") is not None:
                        acked = int(later.data["expected"])
                except ReplyLost:
                    pass
            offset = acked
        if progress:
            progress(acked, size)
    return sent


def _patient(client: DeviceClient, type_: str, data: dict[str, Any], *, total: float, idle: float,
             resends: int = 4) -> dict[str, Any]:
    """A slow request (begin, commit, activate) on a link that may lose frames.

    Waits as long as the device sends ``busy`` heartbeats for it (up to ``total`` seconds). After
    ``idle`` seconds of silence the request or its answer was lost: it is sent again *with the same
    id*; the device runs it if it never got it, or answers from its reply cache if it did. After
    ``resends`` silent windows in a row (nothing at all came back) the link counts as lost
    (``LinkTimeout``).
    """
    mid = client.send(type_, data)
    deadline = time.monotonic() + total
    silent = 0
    while True:
        heard = client.link.wire_bytes_in
        try:
            return dict(client.wait(mid, max(0.01, deadline - time.monotonic()), idle=idle).data)
        except LinkTimeout:
            silent = silent + 1 if client.link.wire_bytes_in == heard else 1
            if silent > resends or time.monotonic() >= deadline:
                raise
            client.send(type_, data, mid=mid)


def flash_bundle(
    svb: Path,
    url: str,
    *,
    token: str | None = None,
    activate: bool = True,
    progress: Progress | None = None,
    reconnects: int = 3,
    activate_timeout: float = 900.0,
    commit_timeout: float = 3600.0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> FlashResult:
    """Land ``svb`` on the device at ``url`` and (by default) boot it; raise ``FlashFailed`` with a one-line reason.

    Promises: returns only when the device has reported the same sha256 the host computed and,
    with ``activate``, a *good* health verdict for the new slot. A dropped link is reconnected up
    to ``reconnects`` times, continuing from the device's offset; a re-run of an interrupted flash
    continues too; a bundle the device already holds (pending or good) is not sent again unless
    ``force``. A digest mismatch (corruption in transit) restarts the transfer once. Slow requests
    (commit, activate) wait while the device sends ``busy`` heartbeats and are re-sent when lost.
    """
    svb = Path(svb)
    say = log or (lambda _m: None)
    try:
        manifest = read_packed_manifest(svb)
    except SottovoceError as exc:
        raise FlashFailed(f"{svb} is not a flashable bundle: {exc}") from exc
    size = svb.stat().st_size
    digest = sha256_of(svb)
    t0 = time.monotonic()
    sent_total = 0
    resumed_from: int | None = None
    drops = 0
    digest_retries = 1
    client: DeviceClient | None = None
    commit: dict[str, Any] | None = None
    wire = [0, 0]
    transfer_s = 0.0
    already = False

    def drop(c: DeviceClient) -> None:
        wire[0] += c.link.wire_bytes_out
        wire[1] += c.link.wire_bytes_in
        c.close()
    try:
        with open(svb, "rb") as fh:
            while commit is None:
                try:
                    if client is None:
                        try:
                            client = connect(url, token)
                        except (LinkClosed, LinkTimeout) as exc:
                            if drops == 0:  # never reached it: no point in retrying
                                raise FlashFailed(f"cannot reach a device at {url}: {exc}") from exc
                            raise
                    link_kind = client.link.kind
                    reply_timeout = 10.0 if link_kind == "tcp" else 2.0
                    idle = IDLE_S.get(link_kind, 3.0)
                    fields: dict[str, Any] = {"size": size, "sha256": digest, "bundle_id": manifest.bundle_id}
                    if force:
                        fields["force"] = True
                    begin = _patient(client, FLASH_BEGIN, fields, total=600, idle=idle)
                    if begin.get("installed"):
                        slot = str(begin["installed"])
                        say(f"slot {slot} already holds this bundle (sha256 {digest[:16]}…): nothing to send")
                        already = True
                        commit = {"slot": slot, "sha256": digest}
                        break
                    start = int(begin["offset"])
                    if resumed_from is None:
                        resumed_from = start
                        if start:
                            say(f"resuming at {start} of {size} bytes")
                    chunk = int(begin.get("chunk") or (256 * 1024 if link_kind == "tcp" else 4096))
                    window = int(begin.get("window") or 4)
                    if progress:
                        progress(start, size)
                    t_send = time.monotonic()
                    sent_total += _send_chunks(client, fh, size, start, chunk, window, progress, reply_timeout)
                    transfer_s += time.monotonic() - t_send
                    commit = _patient(client, FLASH_COMMIT, {"sha256": digest}, total=commit_timeout, idle=idle)
                except RemoteError as exc:
                    if exc.code == "flash.digest" and digest_retries > 0:
                        digest_retries -= 1
                        say(f"device found a corrupted transfer ({exc}); sending again")
                        continue
                    raise
                except (LinkClosed, LinkTimeout, ReplyLost) as exc:
                    drops += 1
                    if drops > reconnects:
                        raise FlashFailed(f"link to {url} lost {drops} times, last: {exc}; "
                                          "re-run the same command to continue where it stopped") from exc
                    say(f"link lost ({exc}); reconnecting ({drops}/{reconnects})")
                    if client is not None:
                        drop(client)
                        client = None
                    time.sleep(min(2.0, 0.2 * drops))
        if commit.get("sha256") != digest:
            raise FlashFailed(f"device computed sha256 {commit.get('sha256')} but the bundle is {digest}")
        result = FlashResult(url, manifest.bundle_id, str(commit["slot"]), digest, size, sent_total,
                             time.monotonic() - t0, size if already else resumed_from or 0, reconnects=drops,
                             transfer_seconds=transfer_s, already_installed=already)
        assert client is not None
        result.wire_bytes_out = wire[0] + client.link.wire_bytes_out
        result.wire_bytes_in = wire[1] + client.link.wire_bytes_in
        if not already:
            say(f"device verified sha256 {digest[:16]}… and installed slot {result.slot}")
        if activate:
            assert client is not None
            say(f"activating slot {result.slot}: the device runs its health check")
            try:
                result.verdict = _patient(client, SLOT_ACTIVATE, {"slot": result.slot}, total=activate_timeout,
                                          idle=IDLE_S.get(client.link.kind, 3.0))
            except (LinkClosed, LinkTimeout, ReplyLost) as exc:
                raise FlashFailed(f"link lost while {url} checked the new slot; run `sottovoce devices` "
                                  f"to see its verdict ({exc})") from exc
        return result
    except RemoteError as exc:
        raise FlashFailed(f"{url}: {exc} [{exc.code}]", code=exc.code) from exc
    except AuthError as exc:
        raise FlashFailed(str(exc), code=exc.code) from exc
    finally:
        if client is not None:
            drop(client)
