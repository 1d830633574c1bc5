"""Keys and signatures (Ed25519, PyNaCl): who may say what on the network.

- The core signs with ``AUTH_SECRET_KEY`` (64 hex characters: the 32-byte seed). It signs job grants
  (which job, along which route, with which sampling), the step payloads it sends, end-of-job orders and the
  end-of-job record the scheduler bills from.
- A worker signs with its own key (``AZU_WORKER_KEY_FILE``, made with mode 0600 on first start): the step
  payloads it hands on and the reports it sends the core. Its public key is its identity
  (``azu:identity:<worker>``, written by the core at enrollment).
- A worker checks the core's signatures with ``AZU_CORE_PUBLIC_KEY``; the core checks a worker's with its
  identity record; a worker checks another worker's with the public key the core put in the job's grant.

Every signed message starts with its own domain prefix, so a signature made for one kind of message is never
accepted as another.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from azu.config import SettingsError, get_settings
from azu.errors import Forbidden

log = logging.getLogger(__name__)

CORE = "core"  # the sender name of whatever the core signs

# Domain prefixes: one per kind of signed message.
GRANT = b"azu-grant\n"
STEPS = b"azu-steps\n"
REPORT = b"azu-report\n"
END_ORDER = b"azu-end-job\n"
END_RECORD = b"azu-end-record\n"
EVIDENCE_ORDER = b"azu-evidence\n"
DIRECT_HELLO = b"azu-direct-hello\n"  # a listener's answer to a direct-path hello (azu.network.direct)


def _seed(hex_text: str, what: str) -> bytes:
    try:
        seed = bytes.fromhex(hex_text.strip())
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise SettingsError(f"{what} must be 64 hex characters (a 32-byte Ed25519 seed)")
    return seed


@lru_cache(maxsize=4)
def _core_key(secret: str | None) -> SigningKey:
    if secret:
        return SigningKey(_seed(secret, "AUTH_SECRET_KEY"))
    # Development only: a key of this process. Several core processes would disagree, so `azu up` and the
    # tests set AUTH_SECRET_KEY; production must.
    log.warning("AUTH_SECRET_KEY is not set: this process signs with a throwaway key (development only)")
    return SigningKey.generate()


def core_signing_key() -> SigningKey:
    """The core's signing key (core processes only)."""
    return _core_key(get_settings().auth_secret_key)


@lru_cache(maxsize=4)
def _verify_key(hex_text: str) -> VerifyKey:
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise Forbidden("a public key must be 64 hex characters")
    return VerifyKey(raw)


def verify_key(public_key_hex: str) -> VerifyKey:
    """The verify key of a hex public key; Forbidden if it is not one."""
    if not isinstance(public_key_hex, str):
        raise Forbidden("a public key must be 64 hex characters")
    return _verify_key(public_key_hex.lower())


def core_public_key() -> str:
    """The core's public key (hex): ``AZU_CORE_PUBLIC_KEY``, else derived from ``AUTH_SECRET_KEY`` when this
    process holds it (a core process, or a single-host development network)."""
    settings = get_settings()
    if settings.core_public_key:
        return settings.core_public_key.lower()
    return public_hex(core_signing_key())


def public_hex(key: SigningKey) -> str:
    return bytes(key.verify_key).hex()


def load_worker_key(path: str | Path) -> SigningKey:
    """The worker's key from ``path`` (hex seed), made there (mode 0600) if the file does not exist yet."""
    path = Path(path)
    if path.exists():
        return SigningKey(_seed(path.read_text(), f"the worker key file {path}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    # O_EXCL: two processes starting at once must not both write (one would sign with a key not on file).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(key).hex())
    log.info("made a new worker key in %s (public key %s)", path, public_hex(key))
    return key


def sign(key: SigningKey, domain: bytes, data: bytes) -> bytes:
    """The 64-byte signature of ``domain + data``."""
    return key.sign(domain + data).signature


def check(public_key_hex: str, domain: bytes, data: bytes, signature: bytes, *, what: str) -> None:
    """Raise Forbidden unless ``signature`` is ``public_key_hex``'s signature of ``domain + data``."""
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise Forbidden(f"{what}: missing or malformed signature")
    try:
        verify_key(public_key_hex).verify(domain + data, signature)
    except BadSignatureError:
        raise Forbidden(f"{what}: bad signature") from None


def digest(data: bytes) -> bytes:
    """What large messages are signed through (one SHA-256 pass instead of Ed25519's two over the data)."""
    return hashlib.sha256(data).digest()


class GrantCache:
    """Grants already verified (by the SHA-256 of their bytes and signature): each is checked once."""

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self._seen: dict[bytes, None] = {}

    def check(self, core_key_hex: str, grant: bytes, grant_sig: bytes) -> None:
        d = digest(grant + grant_sig)
        if d in self._seen:
            return
        check(core_key_hex, GRANT, grant, grant_sig, what="job grant")
        if len(self._seen) >= self.size:
            self._seen.pop(next(iter(self._seen)))
        self._seen[d] = None
