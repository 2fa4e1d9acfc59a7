"""The model bundle contract (format 1): manifest, canonical bytes, packing, verification.

A bundle is a directory (or the same packed as one ``*.svb`` tar) holding ``manifest.json``
and the files it names. Every file is covered by its sha256 in the manifest; the manifest is
covered by an optional ed25519 signature over its canonical bytes (sorted keys, no spaces,
UTF-8, without the ``signature`` field).

Rules enforced here (ARCHITECTURE.md section 3):
- member names are plain relative paths: no ``..``, no absolute paths, no links, no devices;
- an unknown ``format`` is refused with a clear message;
- a bundle is verified (signature, then every hash) before it is activated or run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from edge.errors import BundleError, SignatureError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAGE_NAMES = ("vad", "asr", "llm", "tts", "wake")
REQUIRED_STAGES = ("vad", "asr", "llm", "tts")
#: Upper bound on one unpacked bundle (members summed); a device refuses larger ones.
MAX_BUNDLE_BYTES = 4 * 1024**3
_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """One file of a stage: path relative to the bundle root, its sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass
class StageSpec:
    """What the runtime needs to load one stage, and what the exporter measured about it.

    ``kind`` names the implementation (e.g. ``silero-vad``, ``moonshine``, ``onnx-causal-lm``,
    ``kokoro``); ``config`` holds kind-specific settings (file roles, token ids, voices).
    """

    kind: str
    runtime: str  # "onnxruntime" | "tflite" | "espeak-ng"
    files: list[FileEntry] = field(default_factory=list)
    sample_rate: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    drift: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def file(self, role_or_name: str) -> FileEntry:
        """Return the file whose role (``config['files'][role]``) or basename matches."""
        roles = self.config.get("files", {})
        wanted = roles.get(role_or_name, role_or_name)
        for entry in self.files:
            if entry.path == wanted or PurePosixPath(entry.path).name == wanted:
                return entry
        raise BundleError(f"stage {self.kind!r} has no file {role_or_name!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageSpec":
        data = dict(data)
        data["files"] = [FileEntry(**f) for f in data.get("files", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a bundle."""

    format: int
    bundle_id: str
    created: str
    target: dict[str, Any]
    toolchain: dict[str, Any]
    stages: dict[str, StageSpec]
    signature: dict[str, Any] | None = None
    version: str = "0"
    #: the JSON object as read from disk; signatures cover *it*, not our re-serialization, so a
    #: field this runtime does not know about is still covered
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self, *, with_signature: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format,
            "bundle_id": self.bundle_id,
            "version": self.version,
            "created": self.created,
            "target": self.target,
            "toolchain": self.toolchain,
            "stages": {name: asdict(spec) for name, spec in sorted(self.stages.items())},
        }
        if with_signature and self.signature is not None:
            data["signature"] = self.signature
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        fmt = data.get("format")
        if fmt != FORMAT_VERSION:
            raise BundleError(
                f"bundle format {fmt!r} is not supported by this runtime (it reads format {FORMAT_VERSION}); "
                "update sottovoce on the device or re-export the bundle"
            )
        try:
            stages = {name: StageSpec.from_dict(spec) for name, spec in data["stages"].items()}
            return cls(
                format=fmt,
                bundle_id=data["bundle_id"],
                version=str(data.get("version", "0")),
                created=data["created"],
                target=data["target"],
                toolchain=data.get("toolchain", {}),
                stages=stages,
                signature=data.get("signature"),
                raw=data,
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json is malformed: missing or wrong field {exc}") from exc

    def all_files(self) -> list[FileEntry]:
        """Every file named by any stage, deduplicated by path, in a stable order."""
        seen: dict[str, FileEntry] = {}
        for name in sorted(self.stages):
            for entry in self.stages[name].files:
                seen.setdefault(entry.path, entry)
        return [seen[p] for p in sorted(seen)]

    def canonical_bytes(self) -> bytes:
        """The bytes a signature covers: the manifest as read (or built) without ``signature``, canonical JSON."""
        data = dict(self.raw) if self.raw is not None else self.to_dict(with_signature=False)
        data.pop("signature", None)
        return canonical_json(data)

    def compute_bundle_id(self) -> str:
        """Content hash of the manifest (minus id and signature): same content, same id."""
        data = self.to_dict(with_signature=False)
        data["bundle_id"] = ""
        return "sha256:" + hashlib.sha256(canonical_json(data)).hexdigest()


def canonical_json(data: Any) -> bytes:
    """Serialize ``data`` deterministically: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, relpath: str) -> FileEntry:
    """Hash one file under ``root`` into a manifest entry."""
    check_member_name(relpath)
    path = root / relpath
    return FileEntry(path=relpath, sha256=sha256_file(path), size=path.stat().st_size)


def check_member_name(name: str) -> None:
    """Refuse names that could escape the bundle root (absolute, ``..``, empty, backslashes)."""
    posix = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or posix.is_absolute():
        raise BundleError(f"bundle member {name!r} has an absolute or malformed path")
    if any(part in ("..", "") for part in name.split("/")) or name.startswith("./"):
        raise BundleError(f"bundle member {name!r} tries to leave the bundle directory")


# --------------------------------------------------------------------------- reading


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json`` of an unpacked bundle (no verification)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return Manifest.from_dict(data)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` (pretty, but deterministic: sorted keys)."""
    text = json.dumps(manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    (Path(bundle_dir) / MANIFEST_NAME).write_text(text, "utf-8")


# --------------------------------------------------------------------------- signatures


def load_public_key(path_or_bytes: Path | str | bytes):
    """Load an ed25519 public key (PEM or raw 32 bytes, or base64 of them) for verification."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    try:
        if b"BEGIN PUBLIC KEY" in raw:
            key = serialization.load_pem_public_key(raw)
        else:
            data = raw if len(raw) == 32 else base64.b64decode(raw.strip())
            key = Ed25519PublicKey.from_public_bytes(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
        raise SignatureError(f"public key is not a valid ed25519 key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not an ed25519 key")
    return key


def public_key_id(public_key) -> str:
    """Short stable id of a public key: first 16 hex chars of sha256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_signature(manifest: Manifest, public_keys: Iterable[Any]) -> str:
    """Check the manifest signature against trusted keys; return the key id that signed it.

    Raises ``SignatureError`` when the bundle is unsigned or no trusted key verifies it.
    """
    from cryptography.exceptions import InvalidSignature

    sig = manifest.signature
    if not sig:
        raise SignatureError("bundle is not signed (export it with --sign-key, or allow unsigned bundles explicitly)")
    if sig.get("algorithm") != "ed25519":
        raise SignatureError(f"bundle signature algorithm {sig.get('algorithm')!r} is not supported (ed25519 only)")
    try:
        value = base64.b64decode(sig["value"])
    except Exception as exc:  # noqa: BLE001
        raise SignatureError("bundle signature is not valid base64") from exc
    payload = manifest.canonical_bytes()
    keys = list(public_keys)
    if not keys:
        raise SignatureError("no trusted public key is configured to verify the bundle signature")
    for key in keys:
        try:
            key.verify(value, payload)
            return public_key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError("bundle signature does not match any trusted key (wrong key, or the manifest was altered)")


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verification:
    """Result of a successful verification."""

    manifest: Manifest
    signed_by: str | None  # key id, or None when unsigned bundles were allowed


def verify_bundle_dir(
    bundle_dir: Path,
    *,
    public_keys: Iterable[Any] = (),
    allow_unsigned: bool = False,
) -> Verification:
    """Verify an unpacked bundle: format, signature (unless allowed unsigned), then every file hash.

    Promises: returns only if every file named by the manifest exists with the exact size and
    sha256, no extra unexpected file escapes the root, and the signature (when required) is valid.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    signed_by: str | None = None
    if manifest.signature or not allow_unsigned:
        signed_by = verify_signature(manifest, public_keys)
    missing = [s for s in REQUIRED_STAGES if s not in manifest.stages]
    if missing:
        raise BundleError(f"bundle lacks stage(s) {', '.join(missing)}")
    for entry in manifest.all_files():
        check_member_name(entry.path)
        path = bundle_dir / entry.path
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"bundle file {entry.path} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {entry.path} has {size} bytes, manifest says {entry.size} (truncated or altered)")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle file {entry.path} does not match its sha256 in the manifest (corrupt or altered)")
    return Verification(manifest=manifest, signed_by=signed_by)


# --------------------------------------------------------------------------- packing


def pack_bundle(bundle_dir: Path, out_file: Path) -> Path:
    """Pack a bundle directory into one deterministic tar (``*.svb``).

    Same directory content gives the same bytes: members sorted, manifest first, mtime 0,
    uid/gid 0, no user/group names, mode 0644. Only files named by the manifest are packed.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    names = [MANIFEST_NAME] + [e.path for e in manifest.all_files()]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            src = bundle_dir / name
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, out_file)
    return out_file


def read_packed_manifest(svb: Path) -> Manifest:
    """Read only the manifest of a packed bundle (for ``inspect`` and ``flash``)."""
    try:
        with tarfile.open(svb, mode="r:") as tar:
            member = tar.getmember(MANIFEST_NAME)
            fh = tar.extractfile(member)
            if fh is None:
                raise BundleError(f"{svb}: manifest.json is not a regular file")
            data = json.loads(fh.read().decode("utf-8"))
    except KeyError as exc:
        raise BundleError(f"{svb} is not a bundle: it has no manifest.json") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{svb} is not a readable bundle file (truncated or not a tar): {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{svb}: manifest.json is not valid JSON") from exc
    return Manifest.from_dict(data)


def unpack_bundle(svb: Path, dest: Path, *, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Unpack a ``*.svb`` into ``dest`` defensively; return ``dest``.

    Refuses (``BundleError``) before writing anything outside ``dest``: absolute names, ``..``,
    links, devices, directories posing as files, duplicate names, and a total size above
    ``max_bytes``. Members not named by the manifest are refused too. Does not verify hashes:
    call ``verify_bundle_dir`` on the result.
    """
    dest = Path(dest)
    try:
        with tarfile.open(svb, mode="r:") as tar:
            members = tar.getmembers()
            total = 0
            seen: set[str] = set()
            for m in members:
                check_member_name(m.name)
                if not m.isfile():
                    raise BundleError(f"bundle member {m.name!r} is not a regular file (links and devices are refused)")
                if m.name in seen:
                    raise BundleError(f"bundle member {m.name!r} appears twice")
                seen.add(m.name)
                total += m.size
                if total > max_bytes:
                    raise BundleError(f"bundle unpacks to more than {max_bytes} bytes; refused")
            if MANIFEST_NAME not in seen:
                raise BundleError(f"{svb} is not a bundle: it has no manifest.json")
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for m in members:
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _HASH_BLOCK)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{svb} is not a readable bundle file (truncated or not a tar): {exc}") from exc
    manifest = read_manifest(dest)
    named = {MANIFEST_NAME} | {e.path for e in manifest.all_files()}
    extra = sorted(seen - named)
    if extra:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"bundle holds files the manifest does not cover: {', '.join(extra[:3])}")
    return dest


def open_bundle(path: Path, work_dir: Path | None = None, **verify_kwargs: Any) -> Verification:
    """Verify a bundle given as a directory or a ``.svb`` (unpacked into ``work_dir``) and return it.

    ``verify_kwargs`` go to ``verify_bundle_dir`` (``public_keys``, ``allow_unsigned``).
    The returned manifest's files live in the directory ``bundle_root(verification)`` names.
    """
    path = Path(path)
    if path.is_dir():
        return verify_bundle_dir(path, **verify_kwargs)
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist")
    if work_dir is None:
        raise BundleError("a packed bundle needs a work directory to unpack into")
    unpack_bundle(path, work_dir)
    return verify_bundle_dir(work_dir, **verify_kwargs)


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """A flat, JSON-ready summary (for ``bundle inspect`` and ``hello``)."""
    return {
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "target": manifest.target.get("name"),
        "created": manifest.created,
        "signed": bool(manifest.signature),
        "stages": {
            name: {
                "kind": s.kind,
                "runtime": s.runtime,
                "size": sum(f.size for f in s.files),
                "quantization": s.quantization,
                "drift": s.drift,
            }
            for name, s in sorted(manifest.stages.items())
        },
    }


def bytes_digest(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileEntry",
    "StageSpec",
    "Manifest",
    "Verification",
    "canonical_json",
    "sha256_file",
    "file_entry",
    "check_member_name",
    "read_manifest",
    "write_manifest",
    "load_public_key",
    "public_key_id",
    "verify_signature",
    "verify_bundle_dir",
    "pack_bundle",
    "read_packed_manifest",
    "unpack_bundle",
    "open_bundle",
    "manifest_summary",
    "bytes_digest",
]
