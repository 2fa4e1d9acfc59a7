"""``sottovoce flash`` end to end against the real daemon: pty and TCP links, resume, faults, rollback, fleets."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.protocol import RemoteError
from host.devices import discover
from host.fleet import flash_fleet
from host.flash import FlashFailed, connect, flash_bundle
from tests.flash_support import REPO, Daemon, PtyFaultBridge, TcpFaultProxy, make_svb, state


@pytest.fixture(scope="module")
def svbs(tmp_path_factory):
    src = tmp_path_factory.mktemp("bundles")
    return {
        "old": make_svb(src, "old", size=60_000, seed=1),
        "new": make_svb(src, "new", size=600_000, seed=2),
        "big": make_svb(src, "big", size=3_000_000, seed=3),
        "broken": make_svb(src, "broken", size=60_000, seed=4, fail_health=True),
    }


def corrupt_member(svb: Path, out: Path) -> Path:
    """The same bundle with one byte of a model file changed (its manifest hash no longer matches)."""
    import tarfile

    with tarfile.open(svb) as tar:
        member = tar.getmember("asr/model.onnx")
    data = bytearray(svb.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x40
    out.write_bytes(bytes(data))
    return out


def flash_cli(svb: Path, port: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sottovoce", "flash", str(svb), "--port", port, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_flash_over_a_pty_lands_the_bundle_boots_it_and_refuses_a_corrupted_one(tmp_path, svbs):
    root = tmp_path / "dev1"
    d = Daemon(root)
    try:
        out = flash_cli(svbs["old"], d.port_url)
        assert out.returncode == 0, out.stderr
        out = flash_cli(svbs["new"], d.port_url)
        assert out.returncode == 0, out.stderr
        assert "MB/s" in out.stderr and "healthy" in out.stderr
        bad = flash_cli(corrupt_member(svbs["big"], tmp_path / "corrupt.svb"), d.port_url)
        assert bad.returncode == 1
        reason = [line for line in bad.stderr.splitlines() if line.startswith("sottovoce: error:")]
        assert len(reason) == 1 and "does not match its sha256" in reason[0]
    finally:
        d.stop()
    d = Daemon(root)  # the daemon comes back up on the new bundle
    try:
        status = connect(d.port_url).status()
        new_id = state(root)["slots"][status["active"]]["bundle_id"]
        assert status["active"] == "b" and status["active_bundle"]["version"] == "new"
        assert status["slots"]["a"]["state"] == "good" and new_id == status["active_bundle"]["bundle_id"]
    finally:
        d.stop()


def test_flash_over_tcp_needs_the_token_and_verifies_after_write(tmp_path, svbs):
    d = Daemon(tmp_path / "dev", link="tcp", token="t0k")
    try:
        r = flash_bundle(svbs["big"], d.port_url, token="t0k")
        assert r.sha256 == hashlib.sha256(svbs["big"].read_bytes()).hexdigest()
        assert r.verdict["verdict"] == "good" and r.sent_bytes == r.size
    finally:
        d.stop()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_transfer_truncated_at_a_random_offset_continues_when_the_command_is_rerun(tmp_path, svbs, seed):
    size = svbs["big"].stat().st_size
    cut_at = random.Random(seed).randrange(100_000, size - 100_000)
    d = Daemon(tmp_path / "dev", link="tcp")
    seen = 0

    def cut(direction: str, data: bytes) -> bytes | None:
        nonlocal seen
        if direction == "up":
            seen += len(data)
            if seen > cut_at:
                return None  # the cable is pulled here
        return data

    proxy = TcpFaultProxy(("127.0.0.1", int(d.info["tcp"].rsplit(":", 1)[1])), cut)
    try:
        with pytest.raises(FlashFailed, match="re-run the same command"):
            flash_bundle(svbs["big"], proxy.url, token=d.token, reconnects=0)
        st_ = connect(d.port_url, d.token).status()
        assert 0 < st_["transfer"]["offset"] < size and st_["active"] is None
        r = flash_bundle(svbs["big"], d.port_url, token=d.token)
        # (the old connection may still land chunks the proxy had already passed on)
        assert r.resumed_from >= st_["transfer"]["offset"] and r.sent_bytes == size - r.resumed_from
        assert r.verdict["verdict"] == "good"
    finally:
        proxy.close()
        d.stop()


def test_bytes_lost_mid_frame_on_serial_are_detected_and_the_host_rewinds(tmp_path, svbs):
    d = Daemon(tmp_path / "dev")
    sent = 0
    lost = range(300_001, 303_001)  # 3000 bytes vanish in the middle of a frame

    def fault(direction: str, data: bytes) -> bytes:
        nonlocal sent
        if direction != "up":
            return data
        start, sent = sent, sent + len(data)
        if start < lost.stop and sent > lost.start:
            return bytes(b for i, b in enumerate(data, start) if i not in lost)
        return data

    bridge = PtyFaultBridge(d.port_url, fault)
    try:
        r = flash_bundle(svbs["new"], bridge.path)
        assert r.verdict["verdict"] == "good" and r.sent_bytes > r.size  # the lost part was sent again
        assert connect(bridge.path).status()["bad_frames_total"] >= 1
    finally:
        bridge.close()
        d.stop()


def test_a_serial_link_cut_mid_chunk_is_reconnected_and_the_flash_continues(tmp_path, svbs):
    d = Daemon(tmp_path / "dev")
    sent = 0
    cut_until: float | None = None

    def fault(direction: str, data: bytes) -> bytes:
        nonlocal sent, cut_until
        now = time.monotonic()
        if cut_until is not None and now < cut_until:
            return b""  # unplugged: nothing gets through either way
        if direction == "up" and cut_until is None:
            start, sent = sent, sent + len(data)
            if sent > 200_000:
                cut_until = now + 2.5
                return data[:max(0, 200_000 - start)]  # the frame in flight is cut short
        return data

    bridge = PtyFaultBridge(d.port_url, fault)
    try:
        notes: list[str] = []
        r = flash_bundle(svbs["new"], bridge.path, log=notes.append)
        assert r.verdict["verdict"] == "good" and r.reconnects >= 1
        assert any("link lost" in n for n in notes)
        assert r.sha256 == hashlib.sha256(svbs["new"].read_bytes()).hexdigest()
    finally:
        bridge.close()
        d.stop()


def test_flipped_bits_on_serial_are_dropped_by_the_crc_and_sent_again(tmp_path, svbs):
    d = Daemon(tmp_path / "dev")
    rng = random.Random(7)
    flips = 0

    def fault(direction: str, data: bytes) -> bytes:
        nonlocal flips
        if direction == "up" and len(data) > 1000 and flips < 5 and rng.random() < 0.2:
            flips += 1
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        return data

    bridge = PtyFaultBridge(d.port_url, fault)
    try:
        r = flash_bundle(svbs["new"], bridge.path)
        assert flips > 0 and r.verdict["verdict"] == "good"
        assert r.sha256 == hashlib.sha256(svbs["new"].read_bytes()).hexdigest()
        assert connect(bridge.path).status()["bad_frames_total"] >= 1
    finally:
        bridge.close()
        d.stop()


def test_flipped_bits_on_tcp_are_caught_by_the_whole_bundle_digest(tmp_path, svbs):
    d = Daemon(tmp_path / "dev", link="tcp")
    seen, flipped = 0, False

    def fault(direction: str, data: bytes) -> bytes:
        nonlocal seen, flipped
        if direction == "up":
            seen += len(data)
            if not flipped and seen > 1_000_000 and len(data) > 4000:
                flipped = True
                b = bytearray(data)
                b[len(b) // 2] ^= 0x04
                return bytes(b)
        return data

    proxy = TcpFaultProxy(("127.0.0.1", int(d.info["tcp"].rsplit(":", 1)[1])), fault)
    try:
        notes: list[str] = []
        r = flash_bundle(svbs["big"], proxy.url, token=d.token, log=notes.append)
        assert flipped and any("corrupted" in n for n in notes)
        assert r.verdict["verdict"] == "good" and r.sent_bytes >= 2 * r.size - 1_100_000
    finally:
        proxy.close()
        d.stop()


def test_duplicated_and_reordered_chunks_land_the_exact_bundle(tmp_path, svbs):
    d = Daemon(tmp_path / "dev", link="tcp")
    data = svbs["new"].read_bytes()
    c = 50_000
    try:
        client = connect(d.port_url, d.token)
        assert client.request("flash.begin", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                              ).data["offset"] == 0
        assert client.request("flash.chunk", {"offset": 0}, data[:c]).data["offset"] == c
        assert client.request("flash.chunk", {"offset": 0}, data[:c]).data["offset"] == c  # duplicate
        with pytest.raises(RemoteError) as gap:
            client.request("flash.chunk", {"offset": 2 * c}, data[2 * c:3 * c])  # arrives before its predecessor
        assert gap.value.code == "flash.offset" and gap.value.data["expected"] == c
        off = c
        while off < len(data):
            off = client.request("flash.chunk", {"offset": off}, data[off:off + c]).data["offset"]
        assert client.request("flash.commit").data["sha256"] == hashlib.sha256(data).hexdigest()
        client.close()
    finally:
        d.stop()


def test_a_bundle_larger_than_the_free_space_is_refused(tmp_path, svbs):
    d = Daemon(tmp_path / "dev", extra=["--quota", "1000000"])
    try:
        with pytest.raises(FlashFailed) as info:
            flash_bundle(svbs["big"], d.port_url)
        assert info.value.code == "flash.no_space" and "free" in str(info.value)
    finally:
        d.stop()


def test_a_bundle_whose_models_fail_the_health_check_rolls_back_by_itself(tmp_path, svbs):
    d = Daemon(tmp_path / "dev")
    try:
        flash_bundle(svbs["old"], d.port_url)
        with pytest.raises(FlashFailed) as info:
            flash_bundle(svbs["broken"], d.port_url)
        assert info.value.code == "slot.health" and "stayed on slot a" in str(info.value)
        status = connect(d.port_url).status()
        assert status["active"] == "a" and status["slots"]["b"]["state"] == "bad"
        assert status["active_bundle"]["version"] == "old"
    finally:
        d.stop()


def test_a_fleet_flash_reports_each_device_and_one_failure_does_not_stop_the_others(tmp_path, svbs):
    d1, d2 = Daemon(tmp_path / "d1"), Daemon(tmp_path / "d2", link="tcp", token="fleet")
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[defaults]\ntoken = "fleet"\n\n'
                   f'[[device]]\nname = "kitchen"\nport = "{d1.port_url}"\n\n'
                   f'[[device]]\nname = "gone"\nport = "tcp://127.0.0.1:9"\n\n'
                   f'[[device]]\nname = "hall"\nport = "{d2.port_url}"\n')
    try:
        results = flash_fleet(inv, svbs["new"])
        assert [(r.name, r.ok) for r in results] == [("kitchen", True), ("gone", False), ("hall", True)]
        assert results[1].error and results[0].verdict == "good"
        out = subprocess.run([sys.executable, "-m", "sottovoce", "flash", str(svbs["old"]), "--fleet", str(inv)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "2/3 devices flashed" in out.stdout and "FAILED" in out.stdout
    finally:
        d1.stop()
        d2.stop()


def test_devices_lists_what_answers_hello(tmp_path):
    d1, d2 = Daemon(tmp_path / "d1"), Daemon(tmp_path / "d2", link="tcp", token="k")
    try:
        found = discover(ports=[d1.port_url], addresses=[d2.port_url, "tcp://127.0.0.1:9"], token="k",
                         scan_serial=False, timeout=2)
        assert sorted(f.url for f in found) == sorted([d1.port_url, d2.port_url])
        assert all(f.info["board"] == "x86-dev" and f.ok for f in found)
        locked = discover(addresses=[d2.port_url], token=None, scan_serial=False)
        assert len(locked) == 1 and not locked[0].ok and "token" in locked[0].error
    finally:
        d1.stop()
        d2.stop()


def test_a_tcp_daemon_announces_itself_over_mdns_and_devices_finds_it(tmp_path):
    dev = Daemon(tmp_path / "d1", link="tcp", token="k", mdns=True)
    try:
        found = []
        for _ in range(3):  # multicast answers can be late on a busy machine
            found = discover(token="k", scan_serial=False, mdns=True, timeout=2)
            if any(f.url == dev.port_url for f in found):
                break
        assert [f.url for f in found if f.url == dev.port_url] == [dev.port_url]
        assert next(f for f in found if f.url == dev.port_url).info["board"] == "x86-dev"
    finally:
        dev.stop()


@pytest.mark.models
def test_the_real_x86_dev_bundle_flashes_over_a_pty_and_passes_the_real_health_check(tmp_path, x86_svb):
    from sottovoce.virtual_device import flash_virtual_device

    bundle_dir = flash_virtual_device(x86_svb, tmp_path / "device", quiet=True)
    st_ = state(tmp_path / "device")
    assert st_["last_boot"]["verdict"] == "good" and bundle_dir == tmp_path / "device" / "slots" / st_["active"]
    assert (bundle_dir / "manifest.json").is_file()


def test_a_socket_url_reaches_a_device_behind_a_serial_to_tcp_relay(tmp_path, svbs):
    from tests.flash_support import Ser2Net

    d = Daemon(tmp_path / "dev")
    relay = Ser2Net(d.port_url)
    try:
        r = flash_bundle(svbs["new"], relay.url)
        assert r.verdict["verdict"] == "good" and r.wire_bytes_out > r.size  # COBS frames, not raw TCP messages
    finally:
        relay.close()
        d.stop()


def test_a_device_with_a_trusted_key_refuses_unsigned_bundles_and_takes_signed_ones(tmp_path):
    from export.signing import generate_keypair

    key, pub = generate_keypair(tmp_path / "keys" / "release")
    d = Daemon(tmp_path / "dev", allow_unsigned=False, extra=["--trust", str(pub)])
    try:
        with pytest.raises(FlashFailed) as info:
            flash_bundle(make_svb(tmp_path, "unsigned", size=5000), d.port_url)
        assert info.value.code == "bundle.signature" and "not signed" in str(info.value)
        assert connect(d.port_url).status()["active"] is None
        r = flash_bundle(make_svb(tmp_path, "signed", size=5000, key=key), d.port_url)
        assert r.verdict["verdict"] == "good"
    finally:
        d.stop()


@pytest.mark.slow
def test_flashing_works_while_the_voice_loop_answers_on_the_active_slot(tmp_path, x86_svb):
    REAL = x86_svb
    import json
    import time as _time

    from tests.speech import have_espeak

    if not have_espeak():
        pytest.skip("espeak-ng missing")
    wav = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav),
                    "What is the capital of France? " * 6], check=True)
    root = tmp_path / "dev"
    first = Daemon(root, link="tcp", extra=["--health-check", "edge.runtime:health_check"])
    try:
        flash_bundle(REAL, first.port_url, token=first.token)
    finally:
        first.stop()
    d = Daemon(root, link="tcp", extra=["--health-check", "edge.runtime:health_check", "--voice",
                                        "--voice-input", str(wav), "--voice-output", str(tmp_path / "reply.wav")])
    try:
        client = connect(d.port_url, d.token)
        deadline = _time.monotonic() + 120
        while client.status()["voice"]["state"] != "running" and _time.monotonic() < deadline:
            _time.sleep(0.5)
        assert client.status()["voice"]["state"] == "running"
        r = flash_bundle(REAL, d.port_url, token=d.token, activate=False)
        assert client.status()["voice"]["state"] == "running"  # the transfer never stopped the loop
        verdict = client.request("slot.activate", {"slot": r.slot}, timeout=600).data
        assert verdict["verdict"] == "good" and verdict["active"] == r.slot
        print(json.dumps(client.status()["voice"]))
    finally:
        d.stop()


def test_the_virtual_device_of_the_demo_is_flashed_over_a_pty_and_returns_its_active_bundle(tmp_path, svbs, capfd):
    from sottovoce.virtual_device import flash_virtual_device

    bundle_dir = flash_virtual_device(svbs["new"], tmp_path / "device", health_check="tests.flash_support:health_check")
    assert bundle_dir == tmp_path / "device" / "slots" / "a"
    assert (bundle_dir / "manifest.json").is_file() and state(tmp_path / "device")["last_boot"]["verdict"] == "good"
    assert "MB/s" in capfd.readouterr().err
    assert not (tmp_path / "device" / "run" / "daemon.json").exists()  # the daemon was stopped
