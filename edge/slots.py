"""The A/B slot store of a device (ARCHITECTURE.md section 6).

Layout under the device root::

    state.json            active, previous, pending, boot_attempts, per-slot record, last verdict
    slots/a/  slots/b/    unpacked, verified bundles
    incoming/             the transfer in progress: transfer.json + bundle.part (resumable by offset)
    trusted/*.pub         public keys a bundle signature must verify against

State machine of a slot: ``empty -> installing -> pending -> good | bad``. A transfer only ever
writes to ``incoming/`` and, at commit, to the slot that is *not* active; the commit verifies the
whole file's size and sha256, unpacks defensively, verifies the signature (unless unsigned
bundles are allowed) and every member hash, then marks the slot *pending*. ``boot()`` (run at
every start of the runtime and on ``slot.activate``) tries a pending slot once: it counts the
attempt in ``state.json`` *before* running the health check, so a crash during the check is a
failed attempt on the next start; a passing check marks it *good* and active, a failing one
marks it *bad* and keeps the previous slot. Every state write is temp + fsync + rename.

``SOTTOVOCE_CRASH_AT=<point>`` kills the process (SIGKILL) at one of ``CRASH_POINTS``; the tests
use it to stand in for a power cut at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.bundle import MAX_BUNDLE_BYTES, read_manifest, unpack_bundle, verify_bundle_dir
from edge.errors import BundleError, SottovoceError

log = logging.getLogger("sottovoce.slots")

SLOTS = ("a", "b")
STATE_VERSION = 1
CRASH_ENV = "SOTTOVOCE_CRASH_AT"
CRASH_POINTS = (
    "begin-after-meta",
    "chunk-after-write",
    "commit-after-digest",
    "commit-after-unpack",
    "commit-after-slot-cleared",
    "commit-after-swap",
    "commit-after-state",
    "boot-after-attempt",
    "boot-after-verdict",
    "rollback-after-state",
)
#: how many times a pending slot may be tried before it is declared bad
MAX_BOOT_ATTEMPTS = 1
_FSYNC_EVERY = 16 * 1024 * 1024

HealthCheck = Callable[[Path], dict]


class SlotError(SottovoceError):
    """A slot operation is not possible in the current state."""

    code = "slot.invalid"


class FlashError(SottovoceError):
    """A transfer was refused or failed (offset, digest, space, busy)."""

    code = "flash.failed"


def crash_point(name: str) -> None:
    """Die at once (SIGKILL, no cleanup) when ``$SOTTOVOCE_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def default_health_check(bundle_dir: Path) -> dict:
    """The production check: ``edge.runtime.health_check`` (all models load, one synthetic turn)."""
    from edge.runtime import health_check

    return health_check(bundle_dir)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that a crash leaves either the old or the new file: temp + fsync + rename + dir fsync."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (after unpacking, before the rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class SlotInfo:
    """What ``state.json`` records about one slot."""

    state: str = "empty"  # empty | installing | pending | good | bad
    bundle_id: str | None = None
    sha256: str | None = None
    size: int = 0
    signed_by: str | None = None
    reason: str = ""
    updated: str = ""


@dataclass
class StoreState:
    """The whole ``state.json``."""

    active: str | None = None
    previous: str | None = None
    pending: str | None = None
    boot_attempts: int = 0
    slots: dict[str, SlotInfo] = field(default_factory=lambda: {s: SlotInfo() for s in SLOTS})
    last_boot: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StoreState":
        slots = {s: SlotInfo(**{k: v for k, v in (data.get("slots", {}).get(s) or {}).items()
                                if k in SlotInfo.__dataclass_fields__}) for s in SLOTS}
        st = cls(active=data.get("active"), previous=data.get("previous"), pending=data.get("pending"),
                 boot_attempts=int(data.get("boot_attempts", 0)), slots=slots, last_boot=data.get("last_boot") or {})
        for name in ("active", "previous", "pending"):
            if getattr(st, name) not in (None, *SLOTS):
                setattr(st, name, None)
        return st

    def other(self, slot: str | None) -> str:
        return "b" if slot == "a" else "a"


@dataclass
class Transfer:
    """The bundle being received: declared size/digest, bytes so far, running sha256."""

    size: int
    sha256: str
    bundle_id: str
    offset: int = 0
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.unsynced = 0
        self.fh: Any = None  # the part file, kept open between chunks

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


@dataclass(frozen=True)
class CommitResult:
    slot: str
    bundle_id: str
    sha256: str
    signed_by: str | None


class SlotStore:
    """The device's slots under ``root``; thread-safe (one lock around every operation).

    ``health_check(bundle_dir)`` must raise (any exception) when the bundle cannot serve; it
    defaults to ``edge.runtime.health_check``. ``quota`` caps the bytes the store may hold
    (a board sets it to its data partition); free space is the smaller of the disk's and the quota's.
    """

    def __init__(
        self,
        root: Path,
        *,
        public_keys: list[Any] | None = None,
        allow_unsigned: bool = False,
        health_check: HealthCheck | None = None,
        quota: int | None = None,
        board: str | None = None,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
    ) -> None:
        self.root = Path(root)
        self.public_keys = list(public_keys or [])
        self.allow_unsigned = allow_unsigned
        self.health_check = health_check or default_health_check
        self.quota = quota
        self.board = board
        self.max_bundle_bytes = max_bundle_bytes
        self.lock = threading.RLock()
        self.transfer: Transfer | None = None
        for sub in ("slots", "incoming", "trusted"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._load_trusted()

    # ------------------------------------------------------------------ paths and state

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    @property
    def part_path(self) -> Path:
        return self.root / "incoming" / "bundle.part"

    @property
    def transfer_path(self) -> Path:
        return self.root / "incoming" / "transfer.json"

    def _load_trusted(self) -> None:
        from edge.bundle import load_public_key

        for pub in sorted((self.root / "trusted").glob("*.pub")):
            self.public_keys.append(load_public_key(pub))

    def read_state(self) -> StoreState:
        """The state as it is on disk (a missing or unreadable file is a fresh device)."""
        try:
            data = json.loads(self.state_path.read_text("utf-8"))
            return StoreState.from_dict(data) if isinstance(data, dict) else StoreState()
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError) as exc:
            log.error("state.json is unreadable (%s); starting from the slots on disk", exc)
            return self._state_from_disk()

    def _state_from_disk(self) -> StoreState:
        st = StoreState()
        for slot in SLOTS:
            try:
                v = verify_bundle_dir(self.slot_dir(slot), public_keys=self.public_keys,
                                      allow_unsigned=self.allow_unsigned)
                st.slots[slot] = SlotInfo("good", v.manifest.bundle_id, None, 0, v.signed_by, "recovered", _now())
                st.active = st.active or slot
            except (BundleError, OSError):
                pass
        return st

    def write_state(self, st: StoreState) -> None:
        atomic_write_json(self.state_path, st.to_dict())

    def active_bundle_dir(self) -> Path | None:
        """The directory of the active slot's bundle, or None when the device has no good slot."""
        st = self.read_state()
        return self.slot_dir(st.active) if st.active else None

    # ------------------------------------------------------------------ space

    def used_bytes(self) -> int:
        total = 0
        for dirpath, _d, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    def free_bytes(self) -> int:
        """Bytes the store may still use: disk free space, capped by the quota."""
        free = shutil.disk_usage(self.root).free
        if self.quota is not None:
            free = min(free, max(0, self.quota - self.used_bytes()))
        return free

    # ------------------------------------------------------------------ transfer

    def begin(self, size: int, sha256: str, bundle_id: str = "") -> int:
        """Start (or resume) receiving a bundle of ``size`` bytes with ``sha256``; return the offset to send from.

        The same size and digest as an unfinished transfer resume where it stopped (also after a
        restart); anything else discards the partial file and starts at 0. Refuses bundles over
        the size limit or larger than the free space (the packed file plus its unpacked copy).
        """
        sha256 = sha256.lower()
        if size <= 0 or size > self.max_bundle_bytes:
            raise FlashError(f"bundle of {size} bytes is outside the device limit (1..{self.max_bundle_bytes})",
                             code="flash.too_large")
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise FlashError("flash.begin needs the bundle's sha256 as 64 hex digits", code="protocol.bad_request")
        with self.lock:
            resumed = self._resume_from_disk(size, sha256)
            have = resumed.offset if resumed else 0
            # the packed file still to come, plus the unpacked copy at commit; the old copy of the
            # inactive slot is removed before unpacking, so its bytes count as free
            need = (size - have) + size
            st = self.read_state()
            reclaim = self._tree_size(self.slot_dir(st.other(st.active))) if st.active else 0
            free = self.free_bytes() + reclaim
            if need > free:
                raise FlashError(f"bundle needs {need / 1e6:.1f} MB on the device but only {free / 1e6:.1f} MB are free",
                                 code="flash.no_space")
            if resumed is None:
                self._discard_transfer()
                resumed = Transfer(size=size, sha256=sha256, bundle_id=bundle_id)
                atomic_write_json(self.transfer_path, {"size": size, "sha256": sha256, "bundle_id": bundle_id})
                with open(self.part_path, "wb") as fh:
                    os.fsync(fh.fileno())
                log.info("transfer of %s (%d bytes) begins", sha256[:12], size)
                crash_point("begin-after-meta")
            else:
                log.info("transfer of %s resumes at %d of %d bytes", sha256[:12], resumed.offset, size)
            self.transfer = resumed
            return resumed.offset

    def _resume_from_disk(self, size: int, sha256: str) -> Transfer | None:
        if self.transfer and self.transfer.size == size and self.transfer.sha256 == sha256:
            return self.transfer
        try:
            meta = json.loads(self.transfer_path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("size") != size or meta.get("sha256") != sha256 or not self.part_path.is_file():
            return None
        t = Transfer(size=size, sha256=sha256, bundle_id=str(meta.get("bundle_id", "")))
        have = min(self.part_path.stat().st_size, size)
        with open(self.part_path, "r+b") as fh:
            fh.truncate(have)
            while block := fh.read(1 << 20):
                t.hasher.update(block)
        t.offset = have
        return t

    def write(self, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset`` of the current transfer; return the next offset expected.

        A chunk entirely before the current offset (a duplicate) is ignored; one that starts after
        it (a gap: lost or reordered chunk) is refused with ``flash.offset`` so the sender rewinds.
        """
        with self.lock:
            t = self.transfer
            if t is None:
                raise FlashError("no transfer in progress (send flash.begin first)", code="flash.no_transfer")
            if offset + len(data) > t.size:
                raise FlashError(f"chunk at {offset} (+{len(data)}) runs past the declared size {t.size}",
                                 code="flash.offset")
            if offset > t.offset:
                raise FlashError(f"chunk at offset {offset} but the device expects {t.offset}", code="flash.offset")
            skip = t.offset - offset
            if skip >= len(data):
                return t.offset  # duplicate
            data = data[skip:] if skip else data
            if t.fh is None:
                t.fh = open(self.part_path, "r+b")
            fh = t.fh
            fh.seek(t.offset)
            fh.write(data)
            fh.flush()  # a crash of this process (not of the machine) must keep every acknowledged byte
            t.unsynced += len(data)
            if t.unsynced >= _FSYNC_EVERY:
                os.fsync(fh.fileno())
                t.unsynced = 0
            t.hasher.update(data)
            t.offset += len(data)
            crash_point("chunk-after-write")
            return t.offset

    def installed_slot(self, sha256: str) -> str | None:
        """The slot that already holds the bundle with this whole-file ``sha256`` (pending or good), if any.

        A host re-running a flash whose commit went through (its reply lost) skips the transfer.
        """
        st = self.read_state()
        for slot in SLOTS:
            info = st.slots[slot]
            if info.sha256 == sha256.lower() and info.state in ("pending", "good") and self.slot_dir(slot).is_dir():
                return slot
        return None

    def abort(self) -> None:
        """Drop the transfer in progress and its partial file (the slots are untouched)."""
        with self.lock:
            self._discard_transfer()

    def _discard_transfer(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        self.transfer = None
        for p in (self.part_path, self.transfer_path):
            p.unlink(missing_ok=True)

    def transfer_status(self) -> dict[str, Any] | None:
        t = self.transfer
        if t is None:
            try:
                meta = json.loads(self.transfer_path.read_text("utf-8"))
                have = self.part_path.stat().st_size
                return {"size": meta["size"], "sha256": meta["sha256"], "offset": have, "live": False}
            except (OSError, ValueError, KeyError):
                return None
        return {"size": t.size, "sha256": t.sha256, "offset": t.offset, "live": True}

    def commit(self, sha256: str | None = None) -> CommitResult:
        """Finish the transfer: whole-file size + sha256, defensive unpack, signature and member hashes, mark *pending*.

        ``sha256`` (optional) names the transfer the caller means to commit; another one is refused.
        On a digest mismatch or an invalid bundle the partial file is discarded (the next
        ``flash.begin`` starts from 0) and the slots and the active slot are unchanged.
        """
        with self.lock:
            t = self.transfer
            if t is None:
                raise FlashError("no transfer in progress (send flash.begin first)", code="flash.no_transfer")
            if sha256 is not None and sha256.lower() != t.sha256:
                raise FlashError(f"the transfer in progress is {t.sha256[:16]}…, not {sha256[:16]}…",
                                 code="flash.no_transfer")
            if t.offset != t.size:
                raise FlashError(f"transfer incomplete: {t.offset} of {t.size} bytes received", code="flash.incomplete")
            t.close()
            with open(self.part_path, "rb+") as fh:
                os.fsync(fh.fileno())
            computed = t.hasher.hexdigest()
            if computed != t.sha256:
                self._discard_transfer()
                raise FlashError(f"bundle sha256 on the device is {computed[:16]}…, the host sent {t.sha256[:16]}… "
                                 "(corrupted in transit); send it again", code="flash.digest")
            crash_point("commit-after-digest")
            st = self.read_state()
            slot = st.other(st.active)
            new_dir = self.root / "slots" / f".{slot}.new"
            try:
                unpack_bundle(self.part_path, new_dir, max_bytes=self.max_bundle_bytes)
                verification = verify_bundle_dir(new_dir, public_keys=self.public_keys,
                                                 allow_unsigned=self.allow_unsigned)
                target = verification.manifest.target.get("name")
                if self.board and target and target != self.board:
                    raise BundleError(f"bundle is built for {target!r}, this device is {self.board!r}",
                                      code="bundle.target")
            except BundleError:
                shutil.rmtree(new_dir, ignore_errors=True)
                self._discard_transfer()
                raise
            fsync_tree(new_dir)
            crash_point("commit-after-unpack")
            # the slot about to be replaced stops being anyone's fallback before it is touched
            st.slots[slot] = SlotInfo("installing", updated=_now())
            if st.previous == slot:
                st.previous = None
            if st.pending == slot:
                st.pending = None
                st.boot_attempts = 0
            self.write_state(st)
            crash_point("commit-after-slot-cleared")
            shutil.rmtree(self.slot_dir(slot), ignore_errors=True)
            os.replace(new_dir, self.slot_dir(slot))
            fsync_dir(self.root / "slots")
            crash_point("commit-after-swap")
            m = verification.manifest
            st.slots[slot] = SlotInfo("pending", m.bundle_id, t.sha256, t.size, verification.signed_by, "", _now())
            st.pending = slot
            st.boot_attempts = 0
            self.write_state(st)
            crash_point("commit-after-state")
            self._discard_transfer()
            log.info("bundle %s installed in slot %s, pending its first boot", m.bundle_id[:19], slot)
            return CommitResult(slot, m.bundle_id, computed, verification.signed_by)

    # ------------------------------------------------------------------ boot, activate, rollback

    def recover(self) -> StoreState:
        """Clean what a crash left behind (half-unpacked slots, temp files) and return a consistent state."""
        with self.lock:
            st = self.read_state()
            slots_dir = self.root / "slots"
            for leftover in slots_dir.glob(".*.new"):
                shutil.rmtree(leftover, ignore_errors=True)
            for tmp in self.root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            changed = False
            for slot in SLOTS:
                info = st.slots[slot]
                if info.state == "installing" or (info.state != "empty" and not self.slot_dir(slot).is_dir()):
                    st.slots[slot] = SlotInfo("empty", reason="install interrupted", updated=_now())
                    shutil.rmtree(self.slot_dir(slot), ignore_errors=True)
                    for name in ("active", "previous", "pending"):
                        if getattr(st, name) == slot:
                            setattr(st, name, None)
                    changed = True
            if changed:
                self.write_state(st)
            return st

    def boot(self) -> dict[str, Any]:
        """What the runtime does at every start: recover, try a pending slot once, make sure the active slot verifies.

        Returns the verdict record (also stored as ``last_boot`` in ``state.json``). Never leaves
        the device without its previous good slot.
        """
        with self.lock:
            st = self.recover()
            verdict: dict[str, Any] = {"at": _now(), "tried": None, "verdict": None, "reason": ""}
            if st.pending:
                slot = st.pending
                verdict["tried"] = slot
                if st.boot_attempts >= MAX_BOOT_ATTEMPTS:
                    self._mark_bad(st, slot, "the previous boot attempt never finished (crash or power cut)")
                    verdict.update(verdict="bad", reason=st.slots[slot].reason)
                else:
                    st.boot_attempts += 1
                    self.write_state(st)
                    crash_point("boot-after-attempt")
                    try:
                        verify_bundle_dir(self.slot_dir(slot), public_keys=self.public_keys,
                                          allow_unsigned=self.allow_unsigned)
                        info = self.health_check(self.slot_dir(slot)) or {}
                        log.info("slot %s passed its health check: %s", slot, info)
                        if st.active and st.active != slot:
                            st.previous = st.active
                        st.active = slot
                        st.pending = None
                        st.boot_attempts = 0
                        st.slots[slot].state = "good"
                        st.slots[slot].reason = ""
                        st.slots[slot].updated = _now()
                        verdict.update(verdict="good")
                    except Exception as exc:  # noqa: BLE001 - any failure of the check fails the slot
                        reason = str(exc) or type(exc).__name__
                        log.error("slot %s failed its health check: %s", slot, reason)
                        self._mark_bad(st, slot, reason)
                        verdict.update(verdict="bad", reason=reason)
            self._ensure_active_verifies(st)
            verdict["active"] = st.active
            st.last_boot = verdict
            self.write_state(st)
            if verdict["verdict"] is not None:
                crash_point("boot-after-verdict")
            return verdict

    def _mark_bad(self, st: StoreState, slot: str, reason: str) -> None:
        st.slots[slot].state = "bad"
        st.slots[slot].reason = reason
        st.slots[slot].updated = _now()
        st.pending = None
        st.boot_attempts = 0
        if st.active == slot:
            st.active = st.previous if st.previous != slot else None
            st.previous = None

    def _ensure_active_verifies(self, st: StoreState) -> None:
        for _ in range(2):
            if st.active is None:
                return
            try:
                verify_bundle_dir(self.slot_dir(st.active), public_keys=self.public_keys,
                                  allow_unsigned=self.allow_unsigned)
                return
            except (BundleError, OSError) as exc:
                log.error("active slot %s no longer verifies (%s); falling back", st.active, exc)
                bad = st.active
                st.slots[bad].state = "bad"
                st.slots[bad].reason = f"failed verification at boot: {exc}"
                fallback = st.previous if st.previous and st.slots[st.previous].state == "good" else None
                st.active, st.previous = fallback, None

    def activate(self, slot: str | None = None) -> dict[str, Any]:
        """Boot into ``slot`` (default: the pending one) now: health check, then good or back to the previous slot."""
        with self.lock:
            st = self.read_state()
            target = slot or st.pending
            if target is None:
                raise SlotError("no slot is pending: flash a bundle first", code="slot.nothing_pending")
            if target not in SLOTS:
                raise SlotError(f"unknown slot {target!r} (a or b)", code="slot.unknown")
            if target == st.active:
                return {"at": _now(), "tried": target, "verdict": "good", "reason": "already active",
                        "active": st.active}
            if target != st.pending:
                if st.slots[target].state != "good":
                    raise SlotError(f"slot {target} is {st.slots[target].state}, it cannot be activated",
                                    code="slot.not_bootable")
                st.pending = target
                st.boot_attempts = 0
                self.write_state(st)
            return self.boot()

    def rollback(self) -> StoreState:
        """Make the previous good slot active again (the current one becomes the fallback)."""
        with self.lock:
            st = self.read_state()
            prev = st.previous
            if prev is None or st.slots[prev].state != "good":
                raise SlotError("there is no previous good slot to roll back to", code="slot.no_previous")
            try:
                verify_bundle_dir(self.slot_dir(prev), public_keys=self.public_keys,
                                  allow_unsigned=self.allow_unsigned)
            except BundleError as exc:
                raise SlotError(f"previous slot {prev} no longer verifies: {exc}", code="slot.not_bootable") from exc
            st.active, st.previous = prev, st.active
            st.last_boot = {"at": _now(), "tried": prev, "verdict": "good", "reason": "rollback", "active": prev}
            self.write_state(st)
            crash_point("rollback-after-state")
            return st

    def status(self) -> dict[str, Any]:
        """Everything ``status`` reports: the state file as on disk, the transfer, free space."""
        st = self.read_state()
        data = st.to_dict()
        data["transfer"] = self.transfer_status()
        data["free_bytes"] = self.free_bytes()
        if st.active:
            try:
                m = read_manifest(self.slot_dir(st.active))
                data["active_bundle"] = {"bundle_id": m.bundle_id, "target": m.target.get("name"),
                                         "version": m.version}
            except BundleError:
                data["active_bundle"] = None
        return data

    @staticmethod
    def _tree_size(path: Path) -> int:
        total = 0
        for dirpath, _d, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total
