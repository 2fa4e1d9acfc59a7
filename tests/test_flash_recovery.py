"""Lost requests and answers on the slow steps (commit, activate), and re-runs of a flash that already landed.

The device sends ``busy`` heartbeats while it works and keeps the answers of state-changing
requests per link; the host re-sends a request whose answer never came *with the same id*. So a
frame lost on the line costs a few seconds, never a ten-minute wait, and nothing runs twice.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from host.flash import IDLE_S, flash_bundle
from tests.flash_support import HEALTH_DELAY_ENV, Daemon, PtyFaultBridge, make_svb, state


@pytest.fixture(scope="module")
def svb(tmp_path_factory):
    return make_svb(tmp_path_factory.mktemp("bundles"), "v1", size=120_000, seed=11)


def _drop_first(direction_wanted: str, marker: bytes):
    """A line fault that swallows the first read in one direction that carries ``marker``."""
    dropped = []

    def fault(direction: str, data: bytes) -> bytes:
        if direction == direction_wanted and not dropped and marker in data:
            dropped.append(data)
            return b""
        return data

    return fault, dropped


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_lost_commit_request_or_answer_is_sent_again_and_the_bundle_lands_once(tmp_path, svb, direction):
    d = Daemon(tmp_path / "dev")
    fault, dropped = _drop_first(direction, b'"type":"flash.commit"')
    bridge = PtyFaultBridge(d.port_url, fault)
    try:
        t0 = time.monotonic()
        r = flash_bundle(svb, bridge.path, reconnects=0)
        took = time.monotonic() - t0
        assert dropped, "the fault never hit the commit frame"
        assert r.verdict["verdict"] == "good" and r.reconnects == 0
        assert r.sha256 == hashlib.sha256(svb.read_bytes()).hexdigest() == state(d.root)["slots"][r.slot]["sha256"]
        assert took < 3 * IDLE_S["serial"] + 5
    finally:
        bridge.close()
        d.stop()
    log = d.log_path.read_text()
    assert log.count("installed in slot") == 1  # committed exactly once
    # a lost answer is repeated from the device's reply cache; a lost request simply runs when it arrives
    assert ("reply cache" in log) == (direction == "down")


def test_a_slow_health_check_keeps_the_host_waiting_on_busy_heartbeats(tmp_path, svb):
    delay = IDLE_S["serial"] + 1.5
    d = Daemon(tmp_path / "dev", env={HEALTH_DELAY_ENV: str(delay)})
    try:
        t0 = time.monotonic()
        r = flash_bundle(svb, d.port_url, reconnects=0)
        assert time.monotonic() - t0 >= delay and r.verdict["verdict"] == "good"
    finally:
        d.stop()
    assert "reply cache" not in d.log_path.read_text()  # it was never re-sent: the heartbeats said "working"


def test_rerunning_a_flash_that_already_landed_sends_nothing_unless_forced(tmp_path, svb):
    d = Daemon(tmp_path / "dev", link="tcp")
    try:
        first = flash_bundle(svb, d.port_url, token=d.token, activate=False)
        assert first.sent_bytes == first.size and state(d.root)["pending"] == first.slot
        again = flash_bundle(svb, d.port_url, token=d.token)
        assert again.already_installed and again.sent_bytes == 0 and again.slot == first.slot
        assert again.verdict["verdict"] == "good" and state(d.root)["active"] == first.slot
        forced = flash_bundle(svb, d.port_url, token=d.token, force=True)
        assert not forced.already_installed and forced.sent_bytes == forced.size and forced.slot != first.slot
        assert forced.verdict["verdict"] == "good"
    finally:
        d.stop()


def test_a_silent_line_is_given_up_after_a_bounded_number_of_same_id_resends():
    import os
    import tty

    from edge.framing import SerialDeframer
    from edge.protocol import LinkTimeout, SerialLink
    from host.flash import DeviceClient, _patient

    host_end, device_end = os.openpty()
    tty.setraw(host_end)
    tty.setraw(device_end)
    client = DeviceClient(SerialLink(host_end, name="pty"))
    try:
        t0 = time.monotonic()
        with pytest.raises(LinkTimeout):
            _patient(client, "flash.commit", {"sha256": "0" * 64}, total=60, idle=0.2, resends=2)
        assert time.monotonic() - t0 < 2.0  # bounded by the resends, not by ``total``
        frames = SerialDeframer().feed(os.read(device_end, 65536))
        assert len(frames) == 3 and len({h["id"] for h, _ in frames}) == 1  # one request, sent three times
    finally:
        client.close()
        os.close(device_end)
