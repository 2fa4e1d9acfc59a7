"""ed25519 signing keys and bundle signatures (``sottovoce keys generate``, ``export --sign-key``).

Private keys are PEM (PKCS#8, unencrypted) files readable by their owner only; a key file that
group or others can read is refused, as ssh does. Public keys are PEM ``PATH.pub``.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from edge.bundle import Manifest, public_key_id
from edge.errors import SignatureError


def generate_keypair(out: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new private key to ``out`` (mode 0600) and its public key to ``out.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    if not overwrite and (out.exists() or pub.exists()):
        raise SignatureError(f"{out} already exists; refusing to overwrite a signing key (use --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(out, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def load_private_key(path: Path):
    """Load an ed25519 private key, refusing files others can read and keys of another type."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"signing key {path} does not exist (create one with `sottovoce keys generate --out {path}`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SignatureError(f"signing key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an ed25519 key")
    return key


def sign_manifest(manifest: Manifest, private_key) -> Manifest:
    """Set ``manifest.signature`` to an ed25519 signature over its canonical bytes; returns it."""
    manifest.signature = None
    manifest.raw = None
    value = private_key.sign(manifest.canonical_bytes())
    manifest.signature = {
        "algorithm": "ed25519",
        "key_id": public_key_id(private_key.public_key()),
        "value": base64.b64encode(value).decode("ascii"),
    }
    return manifest
