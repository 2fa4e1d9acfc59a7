"""Byte-level framing of protocol messages on the two links (contract ``edge.protocol``, version 1).

TCP (Wyoming-shaped): one JSON header line terminated by ``\\n`` (``type``, ``id``, ``data``,
``version``, ``payload_length``), then exactly ``payload_length`` payload bytes. TCP already
guarantees order and integrity, so there is no checksum.

Serial: every message is one SLIP frame (RFC 1055, as esptool uses) ``END body' END`` where
``body = version(1) | header_length(2, big-endian) | header JSON | payload | crc32(4, big-endian)``
and ``body'`` is ``body`` with ``END``/``ESC`` escaped. The CRC32 covers everything before it.
A frame that is too short, has a bad escape, a wrong version, or a CRC that does not match is
dropped and counted by the reader; it is never parsed.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from edge.errors import SottovoceError

WIRE_VERSION = 1
END = 0xC0
ESC = 0xDB
ESC_END = 0xDC
ESC_ESC = 0xDD
_END_B = bytes([END])
#: Largest frame body a serial reader accepts (a 4 KiB chunk plus its header fits many times over).
MAX_SERIAL_FRAME = 1024 * 1024
#: Largest JSON header a TCP reader accepts.
MAX_HEADER_BYTES = 64 * 1024
#: Largest payload either link accepts in one message.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


class FramingError(SottovoceError):
    """A frame or header is malformed; the message it carried is dropped."""

    code = "protocol.framing"


def slip_escape(data: bytes) -> bytes:
    """Escape ``END`` and ``ESC`` bytes (no delimiters added)."""
    return data.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")


def slip_unescape(data: bytes) -> bytes:
    """Undo ``slip_escape``; raises ``FramingError`` on a dangling or unknown escape."""
    out = data.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
    if b"\xdb" in data and out.count(b"\xdb") != data.count(b"\xdb\xdd"):
        raise FramingError("bad SLIP escape sequence in frame")
    return out


def encode_serial(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One message as the bytes a serial link carries: ``END escaped(body + crc32) END``."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = struct.pack(">BH", WIRE_VERSION, len(head)) + head + payload
    body += struct.pack(">I", zlib.crc32(body))
    return _END_B + slip_escape(body) + _END_B


def decode_serial_body(escaped: bytes) -> tuple[dict[str, Any], bytes]:
    """Check and parse one frame's content (between two ``END``s); ``FramingError`` if it is bad."""
    body = slip_unescape(escaped)
    if len(body) < 7:
        raise FramingError(f"frame of {len(body)} bytes is too short")
    (crc,) = struct.unpack(">I", body[-4:])
    if zlib.crc32(body[:-4]) != crc:
        raise FramingError("frame CRC32 does not match (corrupted on the line)")
    version, head_len = struct.unpack(">BH", body[:3])
    if version != WIRE_VERSION:
        raise FramingError(f"frame wire version {version} is not {WIRE_VERSION}")
    if 3 + head_len > len(body) - 4:
        raise FramingError("frame header length exceeds the frame")
    header = _parse_header(body[3:3 + head_len])
    return header, body[3 + head_len:-4]


@dataclass
class SerialDeframer:
    """Incremental reader: feed raw bytes, get complete, checked frames; counts what it drops."""

    bad_frames: int = 0
    wire_bytes: int = 0

    def __post_init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """Consume ``data``; return the good frames completed by it, in order."""
        self.wire_bytes += len(data)
        out: list[tuple[dict[str, Any], bytes]] = []
        start = 0
        while True:
            i = data.find(_END_B, start)
            if i < 0:
                self._append(data[start:])
                return out
            self._append(data[start:i])
            start = i + 1
            frame, overflow = bytes(self._buf), self._overflow
            self._buf.clear()
            self._overflow = False
            if not frame and not overflow:
                continue  # back-to-back END: inter-frame fill
            if overflow:
                self.bad_frames += 1
                continue
            try:
                out.append(decode_serial_body(frame))
            except FramingError:
                self.bad_frames += 1

    def _append(self, part: bytes) -> None:
        if self._overflow:
            return
        if len(self._buf) + len(part) > 2 * MAX_SERIAL_FRAME:
            self._overflow = True
            self._buf.clear()
            return
        self._buf += part


def encode_tcp(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One message as the bytes a TCP link carries: header JSON line, then the payload."""
    head = dict(header)
    head["version"] = WIRE_VERSION
    head["payload_length"] = len(payload)
    line = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return line + b"\n" + payload


def parse_tcp_header(line: bytes) -> tuple[dict[str, Any], int]:
    """Parse one TCP header line; return the header and the payload length it announces."""
    header = _parse_header(line.rstrip(b"\r\n"))
    version = header.pop("version", WIRE_VERSION)
    if version != WIRE_VERSION:
        raise FramingError(f"message wire version {version!r} is not {WIRE_VERSION}")
    n = header.pop("payload_length", 0)
    if not isinstance(n, int) or n < 0 or n > MAX_PAYLOAD_BYTES:
        raise FramingError(f"payload_length {n!r} is invalid (0..{MAX_PAYLOAD_BYTES})")
    return header, n


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FramingError(f"message header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FramingError("message header has no 'type'")
    return header
