"""Random sequences of link faults (hypothesis) between the real host code and the real daemon over ptys.

Whatever the line does (bits flipped either way, bytes lost, spans duplicated, noise inserted), a
flash either lands exactly the bundle sent and boots it, or fails with a reason; in both cases the
device afterwards has a good active slot, its status tells the truth, and a clean flash still lands.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.flash import FlashFailed, connect, flash_bundle
from tests.flash_support import Daemon, PtyFaultBridge, make_svb

FAULTS = st.lists(st.tuples(st.sampled_from(["flip", "drop", "dup", "noise"]), st.sampled_from(["up", "down"]),
                            st.integers(0, 400_000)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    svbs = [make_svb(tmp, f"b{i}", size=300_000, seed=i) for i in range(3)]
    d = Daemon(tmp / "dev")
    flash_bundle(svbs[0], d.port_url)
    yield d, svbs
    d.stop()


class LineFaults:
    """Applies each (kind, direction, byte position) once, when that direction's byte count passes it."""

    def __init__(self, faults, seed: int) -> None:
        self.todo = sorted(faults, key=lambda f: f[2])
        self.count = {"up": 0, "down": 0}
        self.rng = random.Random(seed)
        self.applied = 0

    def __call__(self, direction: str, data: bytes) -> bytes:
        start = self.count[direction]
        self.count[direction] += len(data)
        out = bytearray(data)
        for fault in [f for f in self.todo if f[1] == direction and start <= f[2] < start + len(data)]:
            self.todo.remove(fault)
            self.applied += 1
            i = min(fault[2] - start, len(out) - 1)
            kind = fault[0]
            if kind == "flip":
                out[i] ^= 1 << self.rng.randrange(8)
            elif kind == "drop":
                del out[i:i + 2000]
            elif kind == "dup":
                out[i:i] = out[i:i + 5000]
            else:
                out[i:i] = self.rng.randbytes(300)
        return bytes(out)


def _flash_through_faults(device, faults, which: int) -> None:
    d, svbs = device
    svb = svbs[1 + which % 2]
    want = hashlib.sha256(svb.read_bytes()).hexdigest()
    line = LineFaults(faults, which)
    bridge = PtyFaultBridge(d.port_url, line)
    try:
        try:
            r = flash_bundle(svb, bridge.path, reconnects=4)
            assert r.sha256 == want and r.verdict["verdict"] == "good"
            landed = True
        except FlashFailed:
            landed = False
    finally:
        bridge.close()
    client = connect(d.port_url)
    status = client.status()
    client.close()
    active = status["active"]
    assert active in ("a", "b") and status["slots"][active]["state"] == "good" and status["pending"] is None
    if landed:
        assert status["slots"][active]["sha256"] == want
    clean = flash_bundle(svb, d.port_url)  # the device still takes a clean flash
    assert clean.verdict["verdict"] == "good"


@given(faults=FAULTS, which=st.integers(0, 1))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_link_faults_never_land_a_wrong_bundle_or_lose_the_good_slot(device, faults, which):
    _flash_through_faults(device, faults, which)


@pytest.mark.slow
@given(faults=FAULTS, which=st.integers(0, 1))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_link_faults_never_land_a_wrong_bundle_or_lose_the_good_slot_long(device, faults, which):
    _flash_through_faults(device, faults, which)
