"""The control protocol (contract ``edge.protocol``, version 1): one message model, two links.

A ``Message`` is a type, a request id, a JSON object of fields and an optional binary payload.
Requests carry an ``id``; the device answers each with exactly one message of the same ``id``:
either a reply of the request's type or an ``error`` (``code`` + human ``message``).

Links (framing in ``edge.framing``):
- ``TcpLink``: newline-terminated JSON header then the payload (Wyoming-shaped); TCP needs a
  pre-shared token proven by an HMAC-SHA256 challenge-response inside ``hello``.
- ``SerialLink``: COBS frames with CRC32 on any byte stream (a pty, a USB gadget, a pyserial URL);
  bad frames are dropped and counted in ``bad_frames``. Serial is trusted by physical access.

``REQUESTS`` lists every request type and the fields it must carry (with their types), so both
ends validate the same way.

Events carry no ``id``. The device sends ``busy`` (``request``: the id it is working on, ``op``)
about once a second while a long request runs (commit, activate), so a host can tell "still
working" from "request lost on the line" and re-send a lost request *with the same id*; the device
answers a re-sent state-changing request from its reply cache instead of doing it twice.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.errors import SottovoceError
from edge.framing import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    FramingError,
    SerialDeframer,
    encode_serial,
    encode_tcp,
    parse_tcp_header,
)

PROTOCOL_VERSION = 1
AUTH_SCHEME = "hmac-sha256"

HELLO = "hello"
STATUS = "status"
FLASH_BEGIN = "flash.begin"
FLASH_CHUNK = "flash.chunk"
FLASH_COMMIT = "flash.commit"
FLASH_ABORT = "flash.abort"
SLOT_ACTIVATE = "slot.activate"
SLOT_ROLLBACK = "slot.rollback"
LOG = "log"
ERROR = "error"
BUSY = "busy"  # event: the device is still working on request ``data.request``

#: request type -> required field -> accepted Python type(s)
REQUESTS: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"version": int},
    STATUS: {},
    FLASH_BEGIN: {"size": int, "sha256": str},
    FLASH_CHUNK: {"offset": int},
    FLASH_COMMIT: {},
    FLASH_ABORT: {},
    SLOT_ACTIVATE: {},
    SLOT_ROLLBACK: {},
    LOG: {},
}


def register_request(type_: str, fields: dict[str, type | tuple[type, ...]] | None = None) -> None:
    """Add a request type (e.g. ``profile.run``) with its required fields; both ends then validate it."""
    REQUESTS[type_] = dict(fields or {})


class ProtocolError(SottovoceError):
    """A message broke the protocol (unknown type, missing field, wrong version)."""

    code = "protocol.bad_request"


class LinkClosed(SottovoceError):
    """The link dropped (peer closed, cable pulled, daemon died)."""

    code = "link.closed"


class LinkTimeout(SottovoceError):
    """No message arrived within the timeout."""

    code = "link.timeout"


class AuthError(SottovoceError):
    """The peer did not prove it holds the pre-shared token."""

    code = "auth.refused"


class RemoteError(SottovoceError):
    """The device answered a request with an ``error`` message (its code travels here)."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code)
        self.data = data or {}


@dataclass(frozen=True)
class Message:
    """One protocol message: ``type``, request ``id`` (None for events), ``data`` fields, ``payload``."""

    type: str
    id: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {"type": self.type}
        if self.id is not None:
            head["id"] = self.id
        if self.data:
            head["data"] = self.data
        return head

    @classmethod
    def from_header(cls, header: dict[str, Any], payload: bytes) -> "Message":
        data = header.get("data") or {}
        mid = header.get("id")
        if not isinstance(data, dict) or (mid is not None and not isinstance(mid, int)):
            raise FramingError("message header has a malformed 'id' or 'data'")
        return cls(type=header["type"], id=mid, data=data, payload=payload)

    def reply(self, data: dict[str, Any] | None = None, payload: bytes = b"") -> "Message":
        """The successful answer to this request (same type and id)."""
        return Message(self.type, self.id, data or {}, payload)

    def error(self, code: str, message: str, **extra: Any) -> "Message":
        """The failure answer to this request: an ``error`` with a stable code and a human message."""
        return error_message(self.id, code, message, **extra)


def error_message(mid: int | None, code: str, message: str, **extra: Any) -> Message:
    """An ``error`` message; ``extra`` fields (e.g. ``expected`` offset) ride along."""
    return Message(ERROR, mid, {"code": code, "message": message, **extra})


def validate_request(msg: Message) -> None:
    """Raise ``ProtocolError`` unless ``msg`` is a known request with its required fields."""
    spec = REQUESTS.get(msg.type)
    if spec is None:
        raise ProtocolError(f"unknown request type {msg.type!r}", code="protocol.unknown_type")
    if msg.id is None:
        raise ProtocolError(f"request {msg.type!r} carries no id")
    for name, typ in spec.items():
        value = msg.data.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ProtocolError(f"request {msg.type!r} needs field {name!r} ({getattr(typ, '__name__', typ)})")


def auth_mac(token: str, challenge: str) -> str:
    """The proof a client sends: hex HMAC-SHA256 of the challenge under the pre-shared token."""
    return hmac.new(token.encode("utf-8"), b"sottovoce-hello:" + challenge.encode("ascii"), hashlib.sha256).hexdigest()


def check_mac(token: str, challenge: str, mac: Any) -> bool:
    """True when ``mac`` proves knowledge of ``token`` for ``challenge`` (constant-time compare)."""
    return isinstance(mac, str) and hmac.compare_digest(auth_mac(token, challenge), mac)


def new_challenge() -> str:
    """A fresh random challenge (hex, 128 bits)."""
    return os.urandom(16).hex()


# --------------------------------------------------------------------------- links


class Link(Protocol):
    """A bidirectional message link. ``send`` is thread-safe; one reader at a time."""

    kind: str
    wire_bytes_out: int
    wire_bytes_in: int

    def send(self, msg: Message) -> None: ...

    def recv(self, timeout: float | None = None) -> Message: ...

    def close(self) -> None: ...


class TcpLink:
    """Messages over a connected TCP socket: header line + payload."""

    kind = "tcp"

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.wire_bytes_out = 0
        self.wire_bytes_in = 0
        self.bad_frames = 0
        self.peer = _peer_name(sock)

    def send(self, msg: Message) -> None:
        data = encode_tcp(msg.header(), msg.payload)
        with self._send_lock:
            try:
                if msg.payload and len(msg.payload) > 65536:
                    head_end = len(data) - len(msg.payload)
                    self.sock.sendall(memoryview(data)[:head_end])
                    self.sock.sendall(msg.payload)
                else:
                    self.sock.sendall(data)
            except OSError as exc:
                raise LinkClosed(f"TCP link to {self.peer} dropped while sending: {exc}") from exc
        self.wire_bytes_out += len(data)

    def _fill(self, deadline: float | None) -> None:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkTimeout("no answer from the device in time")
            self.sock.settimeout(remaining)
        else:
            self.sock.settimeout(None)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout as exc:
            raise LinkTimeout("no answer from the device in time") from exc
        except OSError as exc:
            raise LinkClosed(f"TCP link to {self.peer} dropped: {exc}") from exc
        if not chunk:
            raise LinkClosed(f"TCP link to {self.peer} was closed by the peer")
        self.wire_bytes_in += len(chunk)
        self._buf += chunk

    def recv(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (nl := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise LinkClosed("peer sent a header line longer than the limit; link dropped")
            self._fill(deadline)
        header, n = parse_tcp_header(bytes(self._buf[:nl]))
        while len(self._buf) < nl + 1 + n:
            self._fill(deadline)
        payload = bytes(self._buf[nl + 1:nl + 1 + n])
        del self._buf[:nl + 1 + n]
        return Message.from_header(header, payload)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class SerialLink:
    """Messages over a byte stream (pty fd, pyserial port): COBS frames with CRC32.

    ``stream`` is either an ``int`` file descriptor or an object with ``read``/``write``
    (pyserial ``Serial``); frames that fail their CRC are dropped and counted in ``bad_frames``.
    """

    kind = "serial"

    def __init__(self, stream: Any, name: str = "serial") -> None:
        self.stream = stream
        self.peer = name
        self._deframer = SerialDeframer()
        self._ready: list[tuple[dict[str, Any], bytes]] = []
        self._send_lock = threading.Lock()
        self.wire_bytes_out = 0
        if not isinstance(stream, int) and getattr(stream, "timeout", None) != 0.1:
            stream.timeout = 0.1  # set once: pyserial reconfigures the port on every change

    @property
    def bad_frames(self) -> int:
        return self._deframer.bad_frames

    @property
    def wire_bytes_in(self) -> int:
        return self._deframer.wire_bytes

    def send(self, msg: Message) -> None:
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError("payload too large for one message")
        data = encode_serial(msg.header(), msg.payload)
        with self._send_lock:
            try:
                if isinstance(self.stream, int):
                    view = memoryview(data)
                    while view:
                        _, w, _ = select.select([], [self.stream], [], 30)
                        if not w:
                            raise LinkClosed(f"serial link {self.peer} stalled: nobody reads the other end")
                        n = os.write(self.stream, view[:65536])
                        view = view[n:]
                else:
                    self.stream.write(data)
            except Exception as exc:  # noqa: BLE001 - OSError, or pyserial's SerialException/SerialTimeoutException
                if isinstance(exc, OSError) or _is_serial_error(exc):
                    raise LinkClosed(f"serial link {self.peer} dropped while sending: {exc}") from exc
                raise
        self.wire_bytes_out += len(data)

    def _read_some(self, deadline: float | None) -> bytes:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if deadline is not None and remaining == 0:
            raise LinkTimeout("no answer from the device in time")
        try:
            if isinstance(self.stream, int):
                r, _, _ = select.select([self.stream], [], [], remaining)
                if not r:
                    raise LinkTimeout("no answer from the device in time")
                data = os.read(self.stream, 1 << 16)
                if not data:
                    raise LinkClosed(f"serial link {self.peer} closed")
                return data
            waiting = getattr(self.stream, "in_waiting", 0)
            data = self.stream.read(max(1, min(waiting, 1 << 16)))
            return data
        except Exception as exc:  # noqa: BLE001 - OSError, or pyserial's SerialException
            if isinstance(exc, OSError) or _is_serial_error(exc):
                raise LinkClosed(f"serial link {self.peer} dropped: {exc}") from exc
            raise

    def recv(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            data = self._read_some(deadline)
            if data:
                self._ready.extend(self._deframer.feed(data))
            elif deadline is not None and time.monotonic() >= deadline:
                raise LinkTimeout("no answer from the device in time")
        header, payload = self._ready.pop(0)
        return Message.from_header(header, payload)

    def close(self) -> None:
        try:
            if isinstance(self.stream, int):
                os.close(self.stream)
            else:
                self.stream.close()
        except OSError:
            pass


def _is_serial_error(exc: BaseException) -> bool:
    return any(cls.__name__ in ("SerialException", "SerialTimeoutException", "PortNotOpenError")
               for cls in type(exc).__mro__)


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


__all__ = [
    "PROTOCOL_VERSION",
    "REQUESTS",
    "BUSY",
    "Message",
    "Link",
    "TcpLink",
    "SerialLink",
    "ProtocolError",
    "LinkClosed",
    "LinkTimeout",
    "AuthError",
    "RemoteError",
    "error_message",
    "validate_request",
    "register_request",
    "auth_mac",
    "check_mac",
    "new_challenge",
]
