"""The control protocol: framing on both links, bad frames dropped and counted, request validation, HMAC auth."""

from __future__ import annotations

import os
import socket
import tty

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.framing import SerialDeframer, cobs_decode, cobs_encode, encode_serial, encode_tcp, parse_tcp_header
from edge.protocol import (
    REQUESTS,
    Message,
    ProtocolError,
    SerialLink,
    TcpLink,
    auth_mac,
    check_mac,
    new_challenge,
    validate_request,
)

headers = st.fixed_dictionaries({"type": st.sampled_from(sorted(REQUESTS)), "id": st.integers(0, 2**40)},
                                optional={"data": st.dictionaries(st.text(max_size=8), st.integers() | st.text())})


@given(header=headers, payload=st.binary(max_size=3000) | st.sampled_from([b"\x00" * 600, bytes(range(256)) * 3, b"\xff" * 1000]))
@settings(max_examples=150, deadline=None)
def test_a_serial_frame_round_trips_any_header_and_payload(header, payload):
    d = SerialDeframer()
    assert d.feed(encode_serial(header, payload)) == [(header, payload)]
    assert d.bad_frames == 0


@given(data=st.binary(max_size=1200) | st.lists(st.sampled_from([b"\x00", b"\x01" * 253, b"\x02" * 254, b"\x03" * 255]),
                                                  max_size=8).map(b"".join))
def test_cobs_round_trips_never_contains_the_delimiter_and_costs_at_most_one_byte_in_254(data):
    encoded = cobs_encode(data)
    assert b"\x00" not in encoded
    assert cobs_decode(encoded) == data
    assert len(encoded) <= len(data) + len(data) // 254 + 1


def test_serial_framing_overhead_does_not_depend_on_the_content():
    """int8 weights are full of the bytes SLIP would escape (C0, DB); COBS costs the same on anything."""
    for payload in (bytes(4096), b"\xc0\xdb" * 2048, os.urandom(4096), b"\xff" * 4096):
        frame = encode_serial({"type": "flash.chunk", "id": 123456, "data": {"offset": 123456789}}, payload)
        assert len(frame) - len(payload) < 100


def test_every_single_bit_flip_in_a_serial_frame_is_dropped_and_counted():
    frame = encode_serial({"type": "flash.chunk", "id": 7, "data": {"offset": 4096}}, os.urandom(200))
    flips = 0
    for byte in range(1, len(frame) - 1):
        for bit in (0, 3, 7):
            bad = bytearray(frame)
            bad[byte] ^= 1 << bit
            d = SerialDeframer()
            got = d.feed(bytes(bad))
            assert got == []
            assert d.bad_frames >= 1
            flips += 1
    assert flips > 600


def test_the_serial_reader_resynchronizes_after_line_noise_and_split_reads():
    good = [encode_serial({"type": "status", "id": i}, bytes([i]) * i) for i in range(1, 6)]
    stream = b"\x00garbage\x00noise" + good[0] + b"\x00\x00" + good[1] + b"\x00half-frame" + good[2] + b"".join(good[3:])
    d = SerialDeframer()
    got = []
    for i in range(0, len(stream), 7):  # dribble the bytes in as a UART would
        got += d.feed(stream[i:i + 7])
    assert [h["id"] for h, _ in got] == [1, 2, 3, 4, 5]
    assert [p for _, p in got] == [bytes([i]) * i for i in range(1, 6)]
    assert d.bad_frames == 3  # "garbage", "noise", "half-frame" each counted once


def test_a_tcp_message_is_a_json_header_line_then_the_payload():
    wire = encode_tcp({"type": "flash.chunk", "id": 3, "data": {"offset": 0}}, b"\n\x00abc")
    line, rest = wire.split(b"\n", 1)
    header, n = parse_tcp_header(line)
    assert header == {"type": "flash.chunk", "id": 3, "data": {"offset": 0}} and n == 5 and rest == b"\n\x00abc"


def test_tcp_link_carries_messages_over_loopback_in_order():
    srv = socket.create_server(("127.0.0.1", 0))
    a = TcpLink(socket.create_connection(srv.getsockname()))
    b = TcpLink(srv.accept()[0])
    big = os.urandom(300_000)
    a.send(Message("flash.chunk", 1, {"offset": 0}, big))
    a.send(Message("status", 2))
    assert b.recv(5) == Message("flash.chunk", 1, {"offset": 0}, big)
    assert b.recv(5) == Message("status", 2)
    for link in (a, b):
        link.close()
    srv.close()


def test_serial_link_over_a_real_pseudo_terminal_pair():
    master, slave = os.openpty()
    tty.setraw(master)
    port = serial.Serial(os.ttyname(slave), timeout=0.1)
    device, host = SerialLink(master, "pty"), SerialLink(port, "host")
    payload = os.urandom(4096) + b"\x00\xc0\xdb" * 10
    host.send(Message("flash.chunk", 9, {"offset": 8192}, payload))
    assert device.recv(5) == Message("flash.chunk", 9, {"offset": 8192}, payload)
    device.send(Message("flash.chunk", 9, {"offset": 8192 + len(payload)}))
    assert host.recv(5).data == {"offset": 8192 + len(payload)}
    os.write(master, b"\x00line noise\x00")
    device.send(Message("status", 10))
    assert host.recv(5).id == 10 and host.bad_frames == 1
    host.close()
    os.close(master)
    os.close(slave)


@pytest.mark.parametrize("msg, code", [
    (Message("reboot.now", 1), "protocol.unknown_type"),
    (Message("flash.begin", 1, {"size": 10}), "protocol.bad_request"),
    (Message("flash.begin", 1, {"size": "10", "sha256": "ab"}), "protocol.bad_request"),
    (Message("flash.chunk", None, {"offset": 0}), "protocol.bad_request"),
    (Message("hello", 1, {"version": True}), "protocol.bad_request"),
])
def test_malformed_requests_are_refused_with_a_stable_code(msg, code):
    with pytest.raises(ProtocolError) as info:
        validate_request(msg)
    assert info.value.code == code


def test_the_hello_proof_depends_on_both_token_and_challenge():
    c1, c2 = new_challenge(), new_challenge()
    assert c1 != c2
    mac = auth_mac("token", c1)
    assert check_mac("token", c1, mac)
    assert not check_mac("token", c2, mac)
    assert not check_mac("other", c1, mac)
    assert not check_mac("token", c1, None)


def test_a_tcp_header_of_another_wire_version_is_refused():
    from edge.framing import FramingError

    with pytest.raises(FramingError, match="wire version"):
        parse_tcp_header(b'{"type":"status","id":1,"version":2,"payload_length":0}')
