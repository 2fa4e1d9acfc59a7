"""Byte-level framing of protocol messages on the two links (contract ``edge.protocol``, version 1).

TCP (Wyoming-shaped): one JSON header line terminated by ``\\n`` (``type``, ``id``, ``data``,
``version``, ``payload_length``), then exactly ``payload_length`` payload bytes. TCP already
guarantees order and integrity, so there is no checksum.

Serial: every message is one COBS frame ``00 cobs(body) 00`` where
``body = version(1) | header_length(2, big-endian) | header JSON | payload | crc32(4, big-endian)``.
The CRC32 covers everything before it. COBS (consistent overhead byte stuffing) removes every
``00`` from the body at a cost of at most one byte per 254, whatever the content; SLIP (esptool's
choice) doubles every ``C0``/``DB`` byte, which costs 1-3 % on int8 model weights. A frame that is
too short, does not decode, has a wrong version, or a CRC that does not match is dropped and
counted by the reader; it is never parsed.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from edge.errors import SottovoceError

WIRE_VERSION = 1
#: the frame delimiter on a serial line (COBS leaves no other zero byte in a frame)
DELIMITER = b"\x00"
#: Largest frame body a serial reader accepts (a 4 KiB chunk plus its header fits many times over).
MAX_SERIAL_FRAME = 1024 * 1024
#: Largest JSON header a TCP reader accepts.
MAX_HEADER_BYTES = 64 * 1024
#: Largest payload either link accepts in one message.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


class FramingError(SottovoceError):
    """A frame or header is malformed; the message it carried is dropped."""

    code = "protocol.framing"


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result holds no zero byte and is at most ``len // 254 + 1`` bytes longer."""
    out = bytearray()
    for segment in data.split(b"\x00"):  # each segment is followed by a zero, except the last
        while len(segment) >= 254:
            out.append(0xFF)
            out += segment[:254]
            segment = segment[254:]
        out.append(len(segment) + 1)
        out += segment
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Undo ``cobs_encode``; raises ``FramingError`` on a zero byte or a block that runs past the end."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FramingError("zero byte inside a COBS frame")
        end = i + code
        if end > n:
            raise FramingError("COBS block runs past the end of the frame")
        out += data[i + 1:end]
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_serial(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One message as the bytes a serial link carries: ``00 cobs(body + crc32) 00``."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = struct.pack(">BH", WIRE_VERSION, len(head)) + head + payload
    body += struct.pack(">I", zlib.crc32(body))
    return DELIMITER + cobs_encode(body) + DELIMITER


def decode_serial_body(escaped: bytes) -> tuple[dict[str, Any], bytes]:
    """Check and parse one frame's content (between two delimiters); ``FramingError`` if it is bad."""
    body = cobs_decode(escaped)
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
            i = data.find(DELIMITER, start)
            if i < 0:
                self._append(data[start:])
                return out
            self._append(data[start:i])
            start = i + 1
            frame, overflow = bytes(self._buf), self._overflow
            self._buf.clear()
            self._overflow = False
            if not frame and not overflow:
                continue  # back-to-back delimiters: inter-frame fill
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
