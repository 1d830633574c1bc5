"""Enrollment: a stranger's machine becomes worker ``<id>`` with a broker login that reaches only its own
queues (design: notes/design_trust.md §Enrollment; the ACL lines were tested, notes/broker_isolation.md).

1. ``issue_challenge``: a random single-use challenge for one worker id, kept 5 minutes in the core's Redis.
2. ``enroll``: the worker's Ed25519 key signs ``b"azu-enroll\\n" + challenge``. The id is bound to the first
   key that enrolls it (azu.network.identity); another key for the same id is refused (403) before anything
   is consumed, created or changed. A wallet is bound, or changed, only with the wallet's own signature over
   ``identity.wallet_message``. The worker then gets a fresh Redis ACL user ``w-<id>`` (a new random password
   each time; the old password's connections are killed) and the ledger gets its wallet
   (``Billing.register_worker``).

What ``w-<id>`` may do (``worker_acl``), and nothing else:

- read and take its own Celery queues ``gpu.<id>`` and ``ctl.<id>`` (and their kombu binding sets), its own
  unacked keys ``unacked:<id>``, ``unacked_index:<id>``, ``unacked_mutex:<id>``, its inbox
  ``azu:pending:<id>`` and ``azu:wake:<id>``;
- write only: LPUSH any ``gpu.*`` (wake the next hop), RPUSH + EXPIRE ``azu:pending:*``, SET + EXPIRE
  ``azu:wake:*``, RPUSH its own ``azu:reports:from:<id>`` (its signed reports to the core) and
  ``azu:reports:ready`` (the hint that its list holds some);
- PUBLISH (not subscribe) ``/<db>.celeryev/*`` (worker heartbeats and task events for Flower).

No job hashes, streams, usage, directory, identities, model status, ``core``/``registry``/``ctl.*`` of
others, pidbox (remote control), SCAN, CONFIG, FLUSH*, CLIENT, MONITOR, SUBSCRIBE. The core's own login must
be allowed ``ACL SETUSER``/``ACL DELUSER``/``CLIENT KILL`` (whoever holds it is effectively the broker's
admin). Redis >= 7 is required: key selectors (the parenthesised rules) appeared in 7.0.

After a Redis restart: ACL users live in Redis's memory, not in its AOF, so every worker's login would be
gone while its Celery process keeps retrying with the old password. The core keeps a record of each login
instead, in a key (so in the AOF): ``azu:acl:logins``, worker id -> the SHA-256 of its password (Redis's own
``#<hash>`` form; the password itself is kept nowhere). ``restore_broker_logins``, run by the collector's
loop every few seconds, re-creates every recorded login Redis does not know (same rules, same password
hash): the workers' connections succeed again at their next retry, with their layers still loaded, and no
worker has to enroll again. A Redis that lost its data too (no AOF) lost the record: those workers' old
password is refused until they enroll again (restart ``azu-worker``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from azu.errors import Conflict, InvalidRequest, ServiceUnavailable, Unauthorized
from azu.network import identity, keys
from azu.network.dispatch import control_queue, worker_queue

if TYPE_CHECKING:
    from azu.billing.base import Billing
    from azu.payments.base import PaymentProvider

log = logging.getLogger(__name__)

CHALLENGE_TTL_S = 300
ENROLL_LOCK_TTL_S = 30
MIN_REDIS_MAJOR = 7


def challenge_key(challenge: str) -> str:
    return f"azu:enroll:challenge:{challenge}"


def enroll_lock_key(worker_id: str) -> str:
    return f"azu:enroll:lock:{worker_id}"


def broker_user(worker_id: str) -> str:
    return f"w-{worker_id}"


# --- the broker login ---------------------------------------------------------------------------------------
def worker_acl(worker_id: str, *, db: int) -> list[str]:
    """The rules of ``ACL SETUSER w-<id> reset on >password <rules>`` (the caller adds the password)."""
    w = identity.check_worker_id(worker_id)
    own_keys = [worker_queue(w), control_queue(w), f"unacked:{w}", f"unacked_index:{w}", f"unacked_mutex:{w}",
                keys.pending(w), keys.wake(w)]
    for queue in (worker_queue(w), control_queue(w)):  # kombu's binding sets (declared when it consumes)
        own_keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    return [
        "-@all",
        # What a Celery 5.7 consumer of its own queues sends (monitored in notes/broker_isolation.md §1),
        # plus the inbox's blocking pops. No Lua (EVAL, EVALSHA, SCRIPT, FCALL): one script that loops holds
        # Redis for every client until it is killed. kombu scripts only queues that expire (azu's do not)
        # and its lock's release, which workers/__init__.py makes a WATCH/MULTI.
        "+ping", "+select", "+brpop", "+blpop", "+blmpop", "+llen", "+lrange", "+ltrim", "+lpush", "+rpush",
        "+sadd", "+smembers", "+srem", "+zadd", "+zrem", "+zrange", "+hset", "+hget", "+hdel", "+set",
        "+get", "+del", "+expire", "+multi", "+exec", "+discard", "+watch", "+unwatch", "+publish",
        *(f"~{k}" for k in own_keys),
        # Publish only (no +subscribe/+psubscribe): heartbeats and task events, never read others' events.
        f"&/{db}.celeryev/*",
        # Write-only selectors (%W): push to others without being able to read, trim or delete.
        "(+lpush %W~gpu.*)",
        "(+rpush +expire %W~azu:pending:*)",
        "(+set +expire %W~azu:wake:*)",
        # Its own report list only (a flood of reports delays its own: azu.network.reports), and the hints.
        f"(+rpush %W~{keys.reports_from(w)} %W~{keys.report_hints()})",
    ]


def check_broker(r: redis.Redis) -> None:
    """Per-worker logins need Redis >= 7 (ACL selectors): say so plainly instead of failing per enrollment."""
    try:
        version = str(r.info("server").get("redis_version", "0"))
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker cannot be reached: {type(exc).__name__}") from None
    if int(version.split(".")[0]) < MIN_REDIS_MAJOR:
        raise ServiceUnavailable(f"the broker is Redis {version}; per-worker logins need Redis >= 7")


LOGINS = keys.ACL_LOGINS  # hash: worker id -> SHA-256 (hex) of its broker password (core-written)


def _set_user(r: redis.Redis, worker_id: str, password_sha256: str) -> None:
    db = int(r.connection_pool.connection_kwargs.get("db", 0) or 0)
    # `reset` first, in the same command: the user never has an old rule next to a new password.
    r.execute_command("ACL", "SETUSER", broker_user(worker_id), "reset", "on", f"#{password_sha256}",
                      *worker_acl(worker_id, db=db))


def grant_broker_access(r: redis.Redis, worker_id: str) -> str:
    """(Re)create ``w-<id>`` with a fresh random password; kill connections made with the old one. The
    password's hash is recorded (``LOGINS``) so the login can be re-created after a Redis restart.

    Returns the new password (never logged)."""
    password = secrets.token_hex(32)
    digest = hashlib.sha256(password.encode()).hexdigest()
    user = broker_user(worker_id)
    try:
        _set_user(r, worker_id, digest)
        r.hset(LOGINS, worker_id, digest)
        killed = r.client_kill_filter(user=user)
    except redis.ResponseError as exc:
        raise ServiceUnavailable(f"the broker refused to create the worker's login ({exc}); the core's Redis "
                                 "login must be allowed ACL SETUSER and CLIENT KILL, on Redis >= 7") from None
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the broker cannot be reached: {type(exc).__name__}") from None
    if killed:
        log.info("enrollment of %s closed %s connection(s) of its previous login", worker_id, killed)
    _save_acl(r)
    return password


def revoke_broker_access(r: redis.Redis, worker_id: str) -> None:
    """Delete ``w-<id>`` and close its connections (an operator's ban; a re-enrollment makes it again)."""
    r.hdel(LOGINS, worker_id)  # first: a restore must not bring it back
    # Its reports not read yet go with it (the collector would still accept them: its identity stays).
    r.srem(keys.REPORTERS, worker_id)
    r.unlink(keys.reports_from(worker_id))
    r.execute_command("ACL", "DELUSER", broker_user(worker_id))  # DELUSER also kills its connections


def restore_broker_logins(r: redis.Redis) -> list[str]:
    """Re-create the recorded worker logins Redis does not know (after a restart: see the module doc).
    Returns the worker ids restored. One ``ACL USERS`` when nothing is missing."""
    recorded: dict[bytes, bytes] = r.hgetall(LOGINS)  # type: ignore[assignment]
    if not recorded:
        return []
    known = {keys.as_str(u) for u in r.execute_command("ACL", "USERS")}
    restored = []
    for raw_id, digest in recorded.items():
        worker_id = keys.as_str(raw_id)
        if broker_user(worker_id) in known:
            continue
        try:
            _set_user(r, worker_id, keys.as_str(digest))
        except (redis.ResponseError, InvalidRequest) as exc:
            log.error("could not restore the broker login of worker %s: %s", worker_id, exc)
            continue
        restored.append(worker_id)
    if restored:
        log.warning("restored the broker login of %d worker(s) Redis lost: %s", len(restored),
                    ", ".join(sorted(restored)))
        _save_acl(r)
    return restored


def _save_acl(r: redis.Redis) -> None:
    # A Redis started with an aclfile keeps the users across restarts; one without has nothing to save to,
    # and its workers enroll again after a restart (their old password is refused).
    with contextlib.suppress(redis.ResponseError):
        r.execute_command("ACL", "SAVE")


def worker_broker_url(public_url: str, worker_id: str, password: str) -> str:
    """``public_url`` (the broker as workers reach it) with the worker's login in place of any other."""
    parts = urlsplit(public_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(broker_user(worker_id), safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, ""))


# --- the protocol -------------------------------------------------------------------------------------------
def issue_challenge(r: redis.Redis, worker_id: str) -> str:
    """A single-use challenge for ``worker_id``, valid ``CHALLENGE_TTL_S`` seconds."""
    identity.check_worker_id(worker_id)
    challenge = secrets.token_hex(32)
    r.set(challenge_key(challenge), worker_id, ex=CHALLENGE_TTL_S)
    return challenge


@dataclass(frozen=True)
class EnrollRequest:
    worker_id: str
    public_key: str
    challenge: str
    signature: str
    wallet: str | None = None
    wallet_signature: str | None = None


@dataclass(frozen=True)
class Enrollment:
    worker_id: str
    broker_url: str
    queues: list[str]
    core_public_key: str
    registry_url: str
    wallet: str | None

    def to_json(self) -> dict[str, object]:
        return {"worker_id": self.worker_id, "broker_url": self.broker_url, "queues": self.queues,
                "core_public_key": self.core_public_key, "registry_url": self.registry_url,
                "wallet": self.wallet}


def enroll(r: redis.Redis, req: EnrollRequest, *, store: identity.IdentityStore,
           provider: Callable[[], PaymentProvider], billing: Billing, broker_public_url: str,
           core_public_key: str, registry_url: str) -> Enrollment:
    """Check the request, bind the identity, issue the worker's broker login (see the module doc).

    Every check that can refuse runs before the challenge is consumed: a refused request (bad signature,
    another key's id, a wallet without its signature) leaves the challenge, the identity, the wallet, the
    broker users and the ledger as they were.
    """
    worker_id = identity.check_worker_id(req.worker_id)
    public_key = identity.parse_public_key(req.public_key).encode().hex()  # normalized: lower-case hex
    if not identity.verify_enroll_signature(public_key, req.challenge, req.signature):
        raise Unauthorized("the signature does not prove control of this public key", param="signature")
    owner = r.get(challenge_key(req.challenge)) if req.challenge.isalnum() else None
    if owner is None or identity._text(owner) != worker_id:
        raise Unauthorized("unknown, expired or already used challenge for this worker id; ask for a new one",
                           param="challenge")
    current = store.get(worker_id)
    if current is not None and current.public_key != public_key:
        raise identity._refuse(worker_id)
    wallet = _checked_wallet(req, public_key, provider) if req.wallet is not None else None
    check_broker(r)

    # One enrollment of an id at a time: two at once would each rotate the password, and one would lose.
    lock = secrets.token_hex(8)
    if not r.set(enroll_lock_key(worker_id), lock, nx=True, ex=ENROLL_LOCK_TTL_S):
        raise Conflict("this worker id is enrolling right now; try again in a moment", param="worker_id")
    try:
        if r.getdel(challenge_key(req.challenge)) is None:  # single use: of two uses, one gets it
            raise Unauthorized("unknown, expired or already used challenge; ask for a new one",
                               param="challenge")
        bound = store.bind(worker_id, public_key, wallet=wallet)
        password = grant_broker_access(r, worker_id)
    finally:
        if r.get(enroll_lock_key(worker_id)) == lock.encode():
            r.delete(enroll_lock_key(worker_id))
    try:
        billing.register_worker(worker_id=worker_id, wallet_address=bound.wallet)
    except Exception:  # the ledger may be down: the worker still serves; the next enrollment registers it
        log.exception("could not register worker %s with the ledger", worker_id)
    log.info("worker %s enrolled (key %s…)", worker_id, public_key[:16])
    return Enrollment(worker_id=worker_id,
                      broker_url=worker_broker_url(broker_public_url, worker_id, password),
                      queues=[worker_queue(worker_id), control_queue(worker_id)],
                      core_public_key=core_public_key, registry_url=registry_url, wallet=bound.wallet)


def _checked_wallet(req: EnrollRequest, public_key: str, provider: Callable[[], PaymentProvider]) -> str:
    """The normalized wallet, once its own signature over ``wallet_message`` checks out."""
    if not req.wallet_signature:
        raise Unauthorized("a wallet needs wallet_signature: the wallet's signature over "
                           f"{identity.wallet_message(req.worker_id, public_key, req.wallet or '')!r}",
                           param="wallet_signature")
    chain = provider()
    wallet = chain.validate_address(req.wallet or "")
    message = identity.wallet_message(req.worker_id, public_key, req.wallet or "")
    if not chain.verify_signature(address=wallet, message=message, signature=req.wallet_signature):
        raise Unauthorized("the wallet signature does not prove control of this wallet",
                           param="wallet_signature")
    return wallet
