"""The A/B slot store: inactive-slot writes, resume by offset, verification, space, health verdicts, crashes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import BundleError, SignatureError
from edge.runtime import HealthCheckError
from edge.slots import CRASH_ENV, FlashError, SlotError, SlotStore
from export.signing import generate_keypair
from tests.flash_support import health_check, make_svb


def store(root: Path, **kw) -> SlotStore:
    kw.setdefault("allow_unsigned", True)
    return SlotStore(root, health_check=health_check, **kw)


def land(s: SlotStore, svb: Path, chunk: int = 10_000) -> dict:
    data = svb.read_bytes()
    off = s.begin(len(data), hashlib.sha256(data).hexdigest())
    while off < len(data):
        off = s.write(off, data[off:off + chunk])
    s.commit()
    return s.activate()


@pytest.fixture()
def bundles(tmp_path):
    return {n: make_svb(tmp_path / "src", n, size=40_000, seed=i, fail_health=(n == "broken"))
            for i, n in enumerate(("one", "two", "broken"))}


def test_flashing_writes_the_inactive_slot_and_a_good_check_makes_it_active(tmp_path, bundles):
    s = store(tmp_path / "dev")
    assert land(s, bundles["one"])["verdict"] == "good"
    a_files = {p: p.read_bytes() for p in (tmp_path / "dev/slots/a").rglob("*") if p.is_file()}
    assert land(s, bundles["two"])["verdict"] == "good"
    st_ = s.read_state()
    assert (st_.active, st_.previous) == ("b", "a")
    assert {p: p.read_bytes() for p in (tmp_path / "dev/slots/a").rglob("*") if p.is_file()} == a_files


def test_a_transfer_resumes_at_the_offset_on_disk_after_a_restart(tmp_path, bundles):
    data = bundles["one"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    s = store(tmp_path / "dev")
    assert s.begin(len(data), digest) == 0
    s.write(0, data[:25_000])
    again = store(tmp_path / "dev")  # a new process: only the disk remembers
    assert again.begin(len(data), digest) == 25_000
    again.write(25_000, data[25_000:])
    assert again.commit().sha256 == digest
    other = hashlib.sha256(b"x").hexdigest()
    assert again.begin(len(data), other) == 0  # another bundle starts over


def test_duplicate_chunks_are_ignored_and_gaps_are_refused_with_the_expected_offset(tmp_path, bundles):
    data = bundles["one"].read_bytes()
    s = store(tmp_path / "dev")
    s.begin(len(data), hashlib.sha256(data).hexdigest())
    assert s.write(0, data[:1000]) == 1000
    assert s.write(0, data[:1000]) == 1000  # duplicate
    assert s.write(500, data[500:1500]) == 1500  # overlapping
    with pytest.raises(FlashError) as gap:
        s.write(3000, data[3000:4000])  # reordered: arrived before 1500..3000
    assert gap.value.code == "flash.offset"
    s.write(1500, data[1500:])
    assert s.commit().sha256 == hashlib.sha256(data).hexdigest()


def test_a_corrupted_transfer_fails_the_whole_bundle_digest_and_starts_over(tmp_path, bundles):
    data = bytearray(bundles["one"].read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    data[20_000] ^= 0x10
    s = store(tmp_path / "dev")
    s.begin(len(data), digest)
    s.write(0, bytes(data))
    with pytest.raises(FlashError) as info:
        s.commit()
    assert info.value.code == "flash.digest"
    assert s.begin(len(data), digest) == 0
    assert s.read_state().slots["a"].state == "empty"


def _svb_with_member_bytes(src: Path, out: Path, member: str, content: bytes) -> Path:
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == member:
                data, m.size = content, len(content)
            tout.addfile(m, io.BytesIO(data))
    return out


def _flash_raw(s: SlotStore, svb: Path):
    data = svb.read_bytes()
    s.begin(len(data), hashlib.sha256(data).hexdigest())
    s.write(0, data)
    return s.commit()


def test_a_bundle_whose_member_does_not_match_its_manifest_hash_is_refused(tmp_path, bundles):
    s = store(tmp_path / "dev")
    land(s, bundles["one"])
    bad = _svb_with_member_bytes(bundles["two"], tmp_path / "bad.svb", "asr/model.onnx", b"tampered" * 100)
    with pytest.raises(BundleError, match="sha256|bytes"):
        _flash_raw(s, bad)
    st_ = s.read_state()
    assert st_.active == "a" and st_.pending is None and st_.slots["b"].state == "empty"
    assert not list((tmp_path / "dev/slots").glob(".*"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_a_tar_with_escaping_or_link_members_is_refused_and_writes_nothing_outside(tmp_path, bundles, kind):
    evil = tmp_path / "evil.svb"
    with tarfile.open(bundles["one"]) as tin, tarfile.open(evil, "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
        info = tarfile.TarInfo({"dotdot": "../../escaped", "absolute": str(tmp_path / "escaped")}.get(kind, "vad/x"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "manifest.json"
        info.size = 0 if kind.endswith("link") else 3
        tout.addfile(info, io.BytesIO(b"bad") if info.size else None)
    s = store(tmp_path / "dev")
    with pytest.raises(BundleError):
        _flash_raw(s, evil)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dev" / "escaped").exists()
    assert s.read_state().slots["a"].state == "empty"


def test_a_bundle_larger_than_the_free_space_is_refused_before_any_byte(tmp_path, bundles):
    size = bundles["one"].stat().st_size
    s = store(tmp_path / "dev", quota=size)  # the packed file fits, the unpacked copy does not
    with pytest.raises(FlashError) as info:
        s.begin(size, hashlib.sha256(bundles["one"].read_bytes()).hexdigest())
    assert info.value.code == "flash.no_space" and "free" in str(info.value)
    assert not (tmp_path / "dev/incoming/bundle.part").exists()
    with pytest.raises(FlashError, match="outside the device limit"):
        s.begin(5 * 1024**3, "0" * 64)


def test_unsigned_bundles_are_refused_unless_allowed_and_signed_ones_need_a_trusted_key(tmp_path):
    key, pub = generate_keypair(tmp_path / "k" / "signing")
    other, _ = generate_keypair(tmp_path / "k" / "other")
    unsigned = make_svb(tmp_path / "src", "u", size=4000)
    signed = make_svb(tmp_path / "src", "s", size=4000, key=key)
    forged = make_svb(tmp_path / "src", "f", size=4000, key=other)
    (tmp_path / "dev" / "trusted").mkdir(parents=True)
    (tmp_path / "dev" / "trusted" / "release.pub").write_bytes(pub.read_bytes())
    s = SlotStore(tmp_path / "dev", health_check=health_check)
    with pytest.raises(SignatureError, match="not signed"):
        _flash_raw(s, unsigned)
    with pytest.raises(SignatureError, match="does not match"):
        _flash_raw(s, forged)
    assert _flash_raw(s, signed).signed_by


def test_a_bundle_whose_models_fail_the_health_check_is_marked_bad_and_the_previous_slot_stays(tmp_path, bundles):
    s = store(tmp_path / "dev")
    land(s, bundles["one"])
    verdict = land(s, bundles["broken"])
    assert verdict["verdict"] == "bad" and "llm model produced no output" in verdict["reason"]
    st_ = s.read_state()
    assert st_.active == "a" and st_.slots["b"].state == "bad" and st_.pending is None
    with pytest.raises(SlotError):
        s.activate("b")


def test_a_crash_during_the_health_check_is_a_failed_attempt_at_the_next_start(tmp_path, bundles):
    s = store(tmp_path / "dev")
    land(s, bundles["one"])
    _flash_raw(s, bundles["two"])

    def dies(bundle_dir):
        os._exit(9)

    pid = os.fork()
    if pid == 0:  # the device, dying (power cut) while it tries the new slot
        SlotStore(tmp_path / "dev", allow_unsigned=True, health_check=dies).boot()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    verdict = store(tmp_path / "dev").boot()
    assert verdict["verdict"] == "bad" and "never finished" in verdict["reason"]
    assert store(tmp_path / "dev").read_state().active == "a"


def test_rollback_returns_to_the_previous_good_slot(tmp_path, bundles):
    s = store(tmp_path / "dev")
    with pytest.raises(SlotError):
        s.rollback()
    land(s, bundles["one"])
    land(s, bundles["two"])
    assert s.rollback().active == "a"
    assert s.read_state().previous == "b"


def test_state_is_written_through_a_temp_file_and_a_stray_temp_is_ignored(tmp_path, bundles):
    s = store(tmp_path / "dev")
    land(s, bundles["one"])
    (tmp_path / "dev" / ".state.json.tmp").write_text("{half a fi")
    assert json.loads((tmp_path / "dev/state.json").read_text())["active"] == "a"
    store(tmp_path / "dev").boot()
    assert not (tmp_path / "dev" / ".state.json.tmp").exists()


# ------------------------------------------------------------------ random fault sequences, real process death

STEPS = st.lists(st.tuples(st.sampled_from(["flash-one", "flash-two", "flash-broken", "partial", "rollback"]),
                           st.sampled_from([None, *__import__("edge.slots").slots.CRASH_POINTS]),
                           st.integers(0, 10**6)), min_size=1, max_size=5)


def _child(root: Path, bundles: dict, op: str, crash: str | None, n: int) -> None:
    if crash:
        os.environ[CRASH_ENV] = crash
    s = store(root)
    s.boot()
    try:
        if op == "rollback":
            s.rollback()
        elif op == "partial":
            data = bundles["two"].read_bytes()
            off = s.begin(len(data), hashlib.sha256(data).hexdigest())
            cut = off + (n % max(1, len(data) - off))
            s.write(off, data[off:cut])
        else:
            land(s, bundles[op.split("-")[1]], chunk=7_000 + n % 5000)
    except (SlotError, FlashError, BundleError, HealthCheckError):
        pass
    os._exit(0)


def _check_invariants(root: Path, bundles: dict, had_good: bool) -> bool:
    s = store(root)
    verdict = s.boot()
    st_ = s.read_state()
    on_disk = json.loads((root / "state.json").read_text()) if (root / "state.json").exists() else {}
    assert on_disk.get("active") == st_.active == verdict["active"]  # status tells the truth
    assert st_.pending is None  # boot settled any pending slot
    if had_good:
        assert st_.active is not None, "the device lost its last good slot"
    if st_.active:
        from edge.bundle import verify_bundle_dir

        verify_bundle_dir(root / "slots" / st_.active, allow_unsigned=True)
        assert st_.slots[st_.active].state == "good"
        health_check(root / "slots" / st_.active)  # and it really serves
    return st_.active is not None


def _run_sequence(tmp_path: Path, bundles: dict, steps) -> None:
    root = tmp_path / f"dev-{os.urandom(4).hex()}"
    had_good = False
    for op, crash, n in steps:
        pid = os.fork()
        if pid == 0:
            try:
                _child(root, bundles, op, crash, n)
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        had_good = _check_invariants(root, bundles, had_good) or had_good
    pid = os.fork()  # whatever happened, a clean flash still lands
    if pid == 0:
        _child(root, bundles, "flash-one", None, 0)
    os.waitpid(pid, 0)
    assert _check_invariants(root, bundles, had_good)


@given(steps=STEPS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_fault_sequences_never_leave_the_device_without_a_good_slot(tmp_path, bundles, steps):
    _run_sequence(tmp_path, bundles, steps)


@pytest.mark.slow
@given(steps=STEPS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_fault_sequences_never_leave_the_device_without_a_good_slot_long(tmp_path, bundles, steps):
    _run_sequence(tmp_path, bundles, steps)


def test_an_active_slot_damaged_on_disk_is_caught_at_boot_and_the_previous_one_takes_over(tmp_path, bundles):
    s = store(tmp_path / "dev")
    land(s, bundles["one"])
    land(s, bundles["two"])
    model = tmp_path / "dev/slots/b/llm/model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # bit rot on the SD card
    verdict = store(tmp_path / "dev").boot()
    st_ = store(tmp_path / "dev").read_state()
    assert verdict["active"] == st_.active == "a" and st_.slots["b"].state == "bad"
    assert "failed verification at boot" in st_.slots["b"].reason
