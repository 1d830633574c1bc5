"""Worker identities: a worker id bound to the first Ed25519 public key that enrolled it, and its wallet.

The binding is the core's record of who a worker is. It lives in PostgreSQL (table ``worker_identities``)
when the core has a ledger (``DATABASE_URL``), else in the core's Redis. In both cases the hex public key is
also written to ``azu:identity:<worker id>`` in the core's Redis, where the collector and placement read it;
no worker login can read or write that key (azu.network.enrollment grants workers nothing under ``azu:*``
but their own inbox).

The worker side is here too: its signing key in a file of its own (``AZU_WORKER_KEY_FILE``, mode 0600) and
the exact bytes it signs. Every signature is PyNaCl's Ed25519; the wallet proves itself with the payment
provider's own signature scheme (EIP-191 / ed25519), as for API keys.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy import CheckConstraint, DateTime, String, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from azu.billing.ledger.models import ADDRESS_LEN, Base
from azu.errors import Forbidden, InvalidRequest
from azu.network import keys

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine

# Lower-case letters, digits and '-', at most 40: the id goes into Redis ACL key patterns (gpu.<id>,
# azu:pending:<id>...), where a glob character (* ? [ ] \) would widen what the worker may touch.
WORKER_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
ENROLL_PREFIX = b"azu-enroll\n"
KEY_BYTES = 32  # an Ed25519 seed / public key
SIGNATURE_BYTES = 64


def identity_key(worker_id: str) -> str:
    """The core-only Redis key holding the worker's hex public key (the collector reads it)."""
    return keys.identity(worker_id)


def wallet_key(worker_id: str) -> str:
    """Without a ledger: the worker's bound wallet (core-only)."""
    return f"azu:identity:{worker_id}:wallet"


def check_worker_id(worker_id: object) -> str:
    if not isinstance(worker_id, str) or not WORKER_ID_RE.fullmatch(worker_id):
        raise InvalidRequest("worker_id must be 1-40 characters of a-z, 0-9 and '-', starting with a letter "
                             "or digit", param="worker_id")
    return worker_id


def _hex_bytes(value: object, size: int, param: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise InvalidRequest(f"{param} must be {2 * size} hex digits", param=param)
    return raw


def parse_public_key(public_key: object) -> VerifyKey:
    return VerifyKey(_hex_bytes(public_key, KEY_BYTES, "public_key"))


def enroll_message(challenge: str) -> bytes:
    """What the worker's key signs to enroll: the prefix, then the challenge the core issued."""
    return ENROLL_PREFIX + challenge.encode("ascii")


def wallet_message(worker_id: str, public_key: str, wallet: str) -> str:
    """What the wallet signs (with its own chain's scheme) to receive the worker's earnings."""
    return f"azu worker {worker_id} key {public_key} pays to {wallet}"


def verify_enroll_signature(public_key: str, challenge: str, signature: object) -> bool:
    sig = _hex_bytes(signature, SIGNATURE_BYTES, "signature")
    try:
        parse_public_key(public_key).verify(enroll_message(challenge), sig)
    except BadSignatureError:
        return False
    return True


def core_public_key(seed_hex: str) -> str:
    """The hex public key of the core's signing key (``AUTH_SECRET_KEY``: the 32-byte seed, 64 hex)."""
    return SigningKey(_hex_bytes(seed_hex, KEY_BYTES, "AUTH_SECRET_KEY")).verify_key.encode().hex()


# --- the worker's own key -----------------------------------------------------------------------------------
def load_or_create_key(path: Path) -> SigningKey:
    """The worker's signing key from ``path`` (its seed in hex), created there first when missing.

    The file is created with mode 0600 in one step (O_EXCL: never over an existing file), and refused when
    group or others can read it, as ssh does: a key others can read is not this worker's any more.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key.encode().hex() + "\n")
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    try:
        return SigningKey(bytes.fromhex(path.read_text().strip()))
    except ValueError:
        raise ValueError(f"{path} does not hold a worker key (64 hex digits)") from None


# --- the store ----------------------------------------------------------------------------------------------
class WorkerIdentity(Base):
    """A worker id, the public key that first enrolled it (never changed), and its bound wallet."""

    __tablename__ = "worker_identities"
    __table_args__ = (
        CheckConstraint("worker_id ~ '^[a-z0-9][a-z0-9-]{0,39}$'", name="worker_id_format"),
        CheckConstraint("public_key ~ '^[0-9a-f]{64}$'", name="public_key_hex"),
    )

    worker_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    wallet_address: Mapped[str | None] = mapped_column(String(ADDRESS_LEN))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


@dataclass(frozen=True)
class Identity:
    worker_id: str
    public_key: str  # hex
    wallet: str | None


class IdentityStore(Protocol):
    def get(self, worker_id: str) -> Identity | None:
        """The worker's identity, or None when the id was never enrolled."""

    def bind(self, worker_id: str, public_key: str, *, wallet: str | None) -> Identity:
        """Bind ``worker_id`` to ``public_key`` unless it is bound to another key (Forbidden, nothing
        changed); set the wallet when ``wallet`` is given (its signature was checked by the caller)."""


def _refuse(worker_id: str) -> Forbidden:
    return Forbidden(f"worker id {worker_id!r} is enrolled with another key", param="public_key")


class RedisIdentityStore:
    """Without a ledger: the identity key itself is the binding (SET NX: the first key wins)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def get(self, worker_id: str) -> Identity | None:
        public_key, wallet = self.r.mget(identity_key(worker_id), wallet_key(worker_id))
        if public_key is None:
            return None
        return Identity(worker_id, _text(public_key), _text(wallet) if wallet is not None else None)

    def bind(self, worker_id: str, public_key: str, *, wallet: str | None) -> Identity:
        if not self.r.set(identity_key(worker_id), public_key, nx=True):
            current = self.r.get(identity_key(worker_id))
            if current is None or _text(current) != public_key:
                raise _refuse(worker_id)
        self.r.sadd(keys.REPORTERS, worker_id)  # its report list is read from now on
        if wallet is not None:
            self.r.set(wallet_key(worker_id), wallet)
        found = self.get(worker_id)
        assert found is not None
        return found


class SqlIdentityStore:
    """With a ledger: PostgreSQL holds the binding; the hex key is copied to Redis for the collector."""

    def __init__(self, engine: Engine, r: redis.Redis) -> None:
        self.engine = engine
        self.r = r

    def get(self, worker_id: str) -> Identity | None:
        with Session(self.engine) as session:
            row = session.get(WorkerIdentity, worker_id)
            return None if row is None else Identity(row.worker_id, row.public_key, row.wallet_address)

    def bind(self, worker_id: str, public_key: str, *, wallet: str | None) -> Identity:
        from azu.billing.ledger.billing import run_in_transaction

        def bind(session: Session) -> Identity:
            # Of two first enrollments at once, the INSERT of one wins; the row lock orders the rest.
            session.execute(insert(WorkerIdentity)
                            .values(worker_id=worker_id, public_key=public_key, wallet_address=wallet)
                            .on_conflict_do_nothing(index_elements=["worker_id"]))
            row = session.execute(select(WorkerIdentity).where(WorkerIdentity.worker_id == worker_id)
                                  .with_for_update()).scalar_one()
            if row.public_key != public_key:
                raise _refuse(worker_id)  # the transaction rolls back: nothing changed
            if wallet is not None:
                row.wallet_address = wallet
            row.enrolled_at = func.now()
            session.flush()
            return Identity(row.worker_id, row.public_key, row.wallet_address)

        identity = run_in_transaction(self.engine, bind)
        publish(self.r, worker_id, identity.public_key)
        return identity


def publish(r: redis.Redis, worker_id: str, public_key: str) -> None:
    """What the core's collector needs of an enrolled worker: its key, and its report list among those read
    (``azu:reporters``). Enrollment writes it; every enrollment writes it again (a worker enrolls at every
    start), so a network enrolled before the list existed fills it as its workers restart."""
    pipe = r.pipeline(transaction=True)
    pipe.set(identity_key(worker_id), public_key)
    pipe.sadd(keys.REPORTERS, worker_id)
    pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
