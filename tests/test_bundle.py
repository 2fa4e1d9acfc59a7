"""The bundle contract: canonical manifest, signatures, hashes, deterministic packing, safe unpacking."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from edge.bundle import (
    FORMAT_VERSION,
    Manifest,
    StageSpec,
    file_entry,
    load_public_key,
    pack_bundle,
    read_manifest,
    unpack_bundle,
    verify_bundle_dir,
    write_manifest,
)
from edge.errors import BundleError, SignatureError
from export.signing import generate_keypair, load_private_key, sign_manifest


def make_bundle(root: Path, key: Path | None = None, payload: bytes = b"model-bytes") -> Manifest:
    """A small but well-formed bundle with one file per required stage."""
    root.mkdir(parents=True, exist_ok=True)
    stages = {}
    for stage in ("vad", "asr", "llm", "tts"):
        (root / stage).mkdir(exist_ok=True)
        (root / stage / "model.onnx").write_bytes(payload + stage.encode())
        stages[stage] = StageSpec(kind="test", runtime="onnxruntime", files=[file_entry(root, f"{stage}/model.onnx")])
    m = Manifest(format=FORMAT_VERSION, bundle_id="", created="2026-01-01T00:00:00Z",
                 target={"name": "x86-dev"}, toolchain={}, stages=stages)
    m.bundle_id = m.compute_bundle_id()
    if key:
        sign_manifest(m, load_private_key(key))
    write_manifest(root, m)
    return m


@pytest.fixture()
def keypair(tmp_path):
    return generate_keypair(tmp_path / "keys" / "signing")


def test_a_signed_bundle_verifies_with_its_public_key(tmp_path, keypair):
    make_bundle(tmp_path / "b", keypair[0])
    v = verify_bundle_dir(tmp_path / "b", public_keys=[load_public_key(keypair[1])])
    assert v.signed_by and len(v.signed_by) == 16


def test_a_bundle_signed_by_another_key_is_refused(tmp_path, keypair):
    other = generate_keypair(tmp_path / "other")
    make_bundle(tmp_path / "b", other[0])
    with pytest.raises(SignatureError, match="does not match any trusted key"):
        verify_bundle_dir(tmp_path / "b", public_keys=[load_public_key(keypair[1])])


def test_an_unsigned_bundle_is_refused_unless_allowed(tmp_path):
    make_bundle(tmp_path / "b")
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle_dir(tmp_path / "b")
    assert verify_bundle_dir(tmp_path / "b", allow_unsigned=True).signed_by is None


@pytest.mark.parametrize("member", ["vad/model.onnx", "llm/model.onnx", "manifest.json"])
def test_flipping_one_byte_of_any_member_fails_verification(tmp_path, keypair, member):
    make_bundle(tmp_path / "b", keypair[0])
    path = tmp_path / "b" / member
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        verify_bundle_dir(tmp_path / "b", public_keys=[load_public_key(keypair[1])])


def test_a_truncated_member_is_reported_as_truncated(tmp_path):
    make_bundle(tmp_path / "b")
    path = tmp_path / "b" / "asr" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BundleError, match="truncated"):
        verify_bundle_dir(tmp_path / "b", allow_unsigned=True)


def test_unknown_format_is_refused_with_a_clear_message(tmp_path):
    make_bundle(tmp_path / "b")
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data["format"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format 99 is not supported"):
        read_manifest(tmp_path / "b")


def test_packing_is_deterministic_and_round_trips(tmp_path, keypair):
    make_bundle(tmp_path / "b", keypair[0])
    a = pack_bundle(tmp_path / "b", tmp_path / "a.svb")
    os.utime(tmp_path / "b" / "vad" / "model.onnx", (1, 1))  # mtimes must not matter
    b = pack_bundle(tmp_path / "b", tmp_path / "b.svb")
    assert a.read_bytes() == b.read_bytes()
    out = unpack_bundle(a, tmp_path / "unpacked")
    verify_bundle_dir(out, public_keys=[load_public_key(keypair[1])])


def _tar_with(tmp_path: Path, add) -> Path:
    good = tmp_path / "good"
    make_bundle(good)
    path = tmp_path / "evil.svb"
    with tarfile.open(path, "w") as tar:
        tar.add(good / "manifest.json", arcname="manifest.json")
        add(tar)
    return path


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "vad/../../escape"])
def test_unpack_refuses_members_that_leave_the_bundle(tmp_path, name):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))

    with pytest.raises(BundleError, match="absolute|leave"):
        unpack_bundle(_tar_with(tmp_path, add), tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_unpack_refuses_links(tmp_path):
    def add(tar):
        info = tarfile.TarInfo("vad/model.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(BundleError, match="not a regular file"):
        unpack_bundle(_tar_with(tmp_path, add), tmp_path / "out")


def test_unpack_refuses_bundles_over_the_size_limit(tmp_path):
    make_bundle(tmp_path / "b", payload=b"x" * 10_000)
    svb = pack_bundle(tmp_path / "b", tmp_path / "b.svb")
    with pytest.raises(BundleError, match="more than"):
        unpack_bundle(svb, tmp_path / "out", max_bytes=5_000)


def test_a_truncated_svb_is_refused(tmp_path):
    make_bundle(tmp_path / "b", payload=b"x" * 100_000)
    svb = pack_bundle(tmp_path / "b", tmp_path / "b.svb")
    svb.write_bytes(svb.read_bytes()[:50_000])
    with pytest.raises(BundleError):
        out = unpack_bundle(svb, tmp_path / "out")
        verify_bundle_dir(out, allow_unsigned=True)


def test_a_signing_key_readable_by_others_is_refused(tmp_path, keypair):
    os.chmod(keypair[0], 0o644)
    with pytest.raises(SignatureError, match="readable by others"):
        load_private_key(keypair[0])


def test_a_signing_key_of_the_wrong_format_is_refused(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(SignatureError, match="not an unencrypted PEM"):
        load_private_key(bad)
