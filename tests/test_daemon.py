"""The edge daemon as a real subprocess: authentication, replies to every request, SIGKILL at every step, installer."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from edge.protocol import Message, RemoteError
from edge.slots import CRASH_POINTS
from host.flash import DeviceClient, FlashFailed, connect, flash_bundle, open_link
from tests.flash_support import REPO, Daemon, make_svb, state


@pytest.fixture()
def svbs(tmp_path):
    return [make_svb(tmp_path / "src", f"v{i}", size=30_000, seed=i) for i in range(2)]


def test_a_wrong_token_is_refused_logged_and_changes_nothing(tmp_path, svbs):
    d = Daemon(tmp_path / "dev", link="tcp", token="right")
    try:
        before = (tmp_path / "dev" / "state.json").read_bytes()
        client = DeviceClient(open_link(d.port_url), d.port_url)
        with pytest.raises(RemoteError) as refused:  # flash without authenticating first
            client.request("flash.begin", {"size": 10, "sha256": "0" * 64})
        assert refused.value.code == "auth.required"
        with pytest.raises(FlashFailed, match="refused the token"):
            flash_bundle(svbs[0], d.port_url, token="wrong")
        with pytest.raises(FlashFailed, match="requires a token"):
            flash_bundle(svbs[0], d.port_url, token=None)
        assert (tmp_path / "dev" / "state.json").read_bytes() == before
        assert not (tmp_path / "dev" / "incoming" / "transfer.json").exists()
        ok = connect(d.port_url, "right")
        assert any("wrong token" in line for line in ok.request("log", {"lines": 50}).data["lines"])
        ok.close()
    finally:
        d.stop()


def test_every_request_gets_a_reply_or_an_error_with_its_id(tmp_path):
    d = Daemon(tmp_path / "dev", link="serial")
    try:
        client = connect(d.port_url)
        cases = [("status", {}, None), ("log", {}, None), ("flash.commit", {}, "flash.no_transfer"),
                 ("flash.chunk", {"offset": 0}, "flash.no_transfer"), ("flash.abort", {}, None),
                 ("slot.activate", {}, "slot.nothing_pending"), ("slot.rollback", {}, "slot.no_previous"),
                 ("flash.begin", {"size": 1}, "protocol.bad_request"), ("format.disk", {}, "protocol.unknown_type"),
                 ("hello", {"version": 99}, "protocol.version")]
        for type_, data, code in cases:
            mid = client.send(type_, data)
            reply = client.link.recv(5)
            assert reply.id == mid
            if code is None:
                assert reply.type == type_
            else:
                assert reply.type == "error" and reply.data["code"] == code and reply.data["message"]
        client.close()
    finally:
        d.stop()


def test_status_counts_bad_frames_on_the_serial_link(tmp_path):
    d = Daemon(tmp_path / "dev", link="serial")
    try:
        client = connect(d.port_url)
        client.link.stream.write(b"\x00this is line noise\x00\x01\x02\x00")
        assert client.status()["link"]["bad_frames"] == 2
        client.close()
    finally:
        d.stop()


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_every_step_leaves_a_bootable_good_slot_and_a_truthful_status(tmp_path, svbs, point):
    root = tmp_path / "dev"
    d = Daemon(root)
    try:
        flash_bundle(svbs[0], d.port_url)
    finally:
        d.stop()
    d = Daemon(root, env={"SOTTOVOCE_CRASH_AT": point})
    try:
        flash_bundle(svbs[1], d.port_url, reconnects=0)
        if point == "rollback-after-state":
            connect(d.port_url).request("slot.rollback")
    except Exception:  # noqa: BLE001 - the daemon died under us, as intended
        pass
    if point != "boot-after-verdict" or d.proc.poll() is not None:
        assert d.wait_dead(30) == -9, f"daemon did not die at {point}"
    else:
        d.kill()
    d.stop()
    d = Daemon(root)  # power back on
    try:
        client = connect(d.port_url)
        status = client.status()
        client.close()
        disk = state(root)
        assert status["active"] == disk["active"] and status["active"] in ("a", "b")
        assert status["slots"][status["active"]]["state"] == "good"
        assert status["pending"] is None
        active_id = status["active_bundle"]["bundle_id"]
        assert (root / "slots" / status["active"] / "manifest.json").is_file()
        assert active_id in {status["slots"][s]["bundle_id"] for s in "ab"}
        again = flash_bundle(svbs[1], d.port_url)  # and the device still takes the update
        assert again.verdict["verdict"] == "good"
    finally:
        d.stop()


def test_the_installer_lays_out_unit_rule_and_root_in_a_scratch_prefix(tmp_path):
    prefix = tmp_path / "board"
    out = subprocess.run([sys.executable, "-m", "sottovoce", "edge", "install", "--prefix", str(prefix), "--no-venv"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    unit = (prefix / "etc/systemd/system/sottovoce-edge.service").read_text()
    assert "ExecStart=/opt/sottovoce/venv/bin/sottovoce edge serve" in unit and "Restart=always" in unit
    rule = (prefix / "etc/udev/rules.d/90-sottovoce-gadget.rules").read_text()
    assert 'SYMLINK+="sottovoce-gadget"' in rule
    assert (prefix / "var/lib/sottovoce").is_dir() and (prefix / "etc/sottovoce/edge.env").is_file()
    assert oct((prefix / "etc/sottovoce/token").stat().st_mode & 0o777) == "0o600"
    assert len((prefix / "etc/sottovoce/token").read_text().strip()) >= 32


def test_the_installer_builds_an_edge_only_environment_without_torch(tmp_path):
    import shutil

    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             ".hypothesis", ".pytest_cache", "__pycache__"))
    wheels = tmp_path / "wheels"  # what a host prepares for an offline board (here: our package alone)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    prefix = tmp_path / "board"
    env = dict(os.environ, PIP_ARGS="--no-deps")
    out = subprocess.run([sys.executable, "-m", "sottovoce", "edge", "install", "--prefix", str(prefix),
                          "--wheelhouse", str(wheels)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    sv = prefix / "opt/sottovoce/venv/bin/sottovoce"
    assert subprocess.run([str(sv), "edge", "serve", "--help"], capture_output=True, timeout=60).returncode == 0
    probe = subprocess.run([str(prefix / "opt/sottovoce/venv/bin/python"), "-c",
                            "import edge.daemon, edge.slots, edge.protocol, sys; "
                            "print(sorted(m for m in ('torch', 'host', 'export') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stderr
