"""The direct path: hand-overs sent from one worker to the next over TCP, not through Redis.

Through Redis a hand-over crosses the network twice (sender -> Redis -> receiver); direct, once. Between
distant hosts that halves a token's network time at batch 1 (bench/latency.py). Redis stays the path for
everything else (the core's steps, end orders, reports) and the fallback for a hand-over whenever the direct
one cannot be used.

Who may read: the hidden states are a user's prompt in another form, so every frame is encrypted to the
receiver's key (NaCl ``Box``: X25519 from the two workers' Ed25519 keys, XSalsa20-Poly1305). The receiver's
key is the one the core's grant names for that hop, so only that worker can read what is sent to it,
whatever address it was sent to.

Who may write: a connection opens with a hello, ``MAGIC | sender's public key | challenge`` (32 random
bytes). The listener answers ``base | signature``: 16 random bytes of its own and its signature (domain
``auth.DIRECT_HELLO``) of the challenge, the base and the sender's key. The sender checks that signature
against the key the grant names before it sends a frame, so an address that is not the grant's worker's
(a worker that advertised someone else's) gets the hello and nothing more. Frames are ``length (4 bytes) |
Box ciphertext`` with the nonce ``base | counter`` (8 bytes, from 0): a frame cannot be replayed on another
connection (another base) or twice on one (the counter moved on), and cannot be forged without the
sender's private key. The plaintext is the same signed ``StepBundle`` the Redis path carries, checked the
same way (``WorkerNode._admit_bundle``); before that the listener checks that the core-signed grant of the
bundle's first step names the connection's key for the bundle's sender (``admit``), so a stranger who can
reach the port gets nothing queued. A frame that fails any check, or is larger than ``max_frame``, closes
its connection.

Limits: ``max_connections`` open at once (the rest are closed at accept), a handshake deadline, a frame
size cap. A send that fails (no listener, a refused hello, a broken connection) returns False and the
caller sends that hand-over through Redis; the address is not tried again for ``backoff_s``. A step that
arrives twice (once each way, after a send whose fate is unknown) is answered from its remembered output,
as any duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from azu.errors import AzuError, InvalidRequest
from azu.network import auth

log = logging.getLogger(__name__)

MAGIC = b"azu-direct/1\n"
CHALLENGE_BYTES = 32
BASE_BYTES = 16  # the listener's per-connection part of every nonce (24 bytes with an 8-byte counter)
_HELLO = len(MAGIC) + 32 + CHALLENGE_BYTES
_ANSWER = BASE_BYTES + 64
_LENGTH = struct.Struct(">I")
BOX_OVERHEAD = SecretBox.MACBYTES  # a Box frame carries the same 16-byte tag

MAX_FRAME = 64 << 20  # a 2048-token prompt's hidden state at hidden size 896 is 7.3 MB
MAX_CONNECTIONS = 64
HANDSHAKE_S = 10.0
CONNECT_S = 3.0
BACKOFF_S = 10.0


def parse_address(url: str) -> tuple[str, int]:
    """``host:port`` of a P2P URL (``tcp://host:port``; any scheme, or none, is read the same way)."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise InvalidRequest(f"a P2P address must be host:port (as in tcp://10.0.0.5:8003), got {url!r}")
    return parts.hostname, port


def _nonce(base: bytes, counter: int) -> bytes:
    return base + counter.to_bytes(8, "big")


def _box(own: SigningKey, other_public: bytes) -> Box:
    return Box(own.to_curve25519_private_key(), VerifyKey(other_public).to_curve25519_public_key())


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``conn``; b"" if it closed before the first, ConnectionError if it closed midway."""
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise ConnectionError("connection closed in the middle of a frame")
            return b""
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _tune(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a decode step's frame goes out at once


# --- receiving ---------------------------------------------------------------------------------
class Listener:
    """Accepts connections from other workers; hands each frame that passes ``admit`` to ``on_frame``.

    ``admit(plaintext, sender_public_hex)`` returns whether the frame may be queued (False closes the
    connection); ``on_frame(plaintext)`` queues it for the worker's session."""

    def __init__(self, key: SigningKey, bind: tuple[str, int], *, on_frame: Callable[[bytes], None],
                 admit: Callable[[bytes, str], bool], max_frame: int = MAX_FRAME,
                 max_connections: int = MAX_CONNECTIONS, handshake_s: float = HANDSHAKE_S) -> None:
        self.key = key
        self.public = bytes(key.verify_key)
        self.on_frame = on_frame
        self.admit = admit
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.handshake_s = handshake_s
        self._private: PrivateKey = key.to_curve25519_private_key()
        self._sock = socket.create_server(bind, reuse_port=False)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.refused = 0  # connections closed for a failed check (tests, metrics)
        self.frames = 0  # frames handed on
        self._thread = threading.Thread(target=self._serve, name="azu-direct-listener", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.05)  # out of file descriptors, say: do not spin
                continue
            with self._lock:
                full = len(self._open) >= self.max_connections
                if not full:
                    self._open.add(conn)
            if full:
                log.warning("direct path: %d connections open, one more refused", self.max_connections)
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="azu-direct-conn",
                             daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._receive(conn)
        except (OSError, ConnectionError) as exc:
            log.debug("direct connection closed: %s", exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _refuse(self, why: str) -> None:
        self.refused += 1
        log.warning("direct path: connection closed: %s", why)

    def _receive(self, conn: socket.socket) -> None:
        _tune(conn)
        conn.settimeout(self.handshake_s)
        hello = _recv_exact(conn, _HELLO)
        if len(hello) != _HELLO or not hello.startswith(MAGIC):
            return self._refuse("not a direct-path hello")
        sender = hello[len(MAGIC):len(MAGIC) + 32]
        challenge = hello[len(MAGIC) + 32:]
        try:
            box = Box(self._private, VerifyKey(sender).to_curve25519_public_key())
        except Exception:  # PyNaCl raises several kinds for a point that is not a key
            return self._refuse("the hello's key is not an Ed25519 public key")
        base = os.urandom(BASE_BYTES)
        conn.sendall(base + auth.sign(self.key, auth.DIRECT_HELLO, challenge + base + sender))
        conn.settimeout(None)
        sender_hex = sender.hex()
        counter = 0
        while not self._stopped.is_set():
            head = _recv_exact(conn, _LENGTH.size)
            if not head:
                return None
            (size,) = _LENGTH.unpack(head)
            if size > self.max_frame + BOX_OVERHEAD:
                return self._refuse(f"a frame of {size} bytes (at most {self.max_frame})")
            body = _recv_exact(conn, size)
            if len(body) != size:
                return None
            try:
                plain = box.decrypt(body, _nonce(base, counter))
            except CryptoError:
                return self._refuse("a frame that does not decrypt (forged, or replayed)")
            counter += 1
            try:
                if not self.admit(plain, sender_hex):
                    return self._refuse(f"a frame from {sender_hex[:16]}… that its grant does not name")
            except AzuError as exc:
                return self._refuse(exc.message)
            self.frames += 1
            self.on_frame(plain)
        return None


# --- sending -----------------------------------------------------------------------------------
@dataclass
class _Connection:
    address: tuple[str, int]
    public_key: str
    sock: socket.socket
    box: Box
    base: bytes
    counter: int = 0


class Connections:
    """The sending side: one connection per receiving worker, opened on first use (``send``)."""

    def __init__(self, key: SigningKey, *, connect_s: float = CONNECT_S,
                 backoff_s: float = BACKOFF_S) -> None:
        self.key = key
        self.public = bytes(key.verify_key)
        self.connect_s = connect_s
        self.backoff_s = backoff_s
        self._conns: dict[str, _Connection] = {}
        self._failed: dict[tuple[str, tuple[str, int]], float] = {}  # (worker, address) -> retry after
        self._lock = threading.Lock()
        self.sent = 0  # frames sent (tests, metrics)

    def usable(self, worker_id: str, address: tuple[str, int]) -> bool:
        """Whether a send to ``worker_id`` at ``address`` would be tried now (not backing off)."""
        return time.monotonic() >= self._failed.get((worker_id, address), 0.0)

    def send(self, worker_id: str, url: str, public_key: str, blob: bytes) -> bool:
        """Send ``blob`` to ``worker_id`` (listening at ``url``, holding ``public_key``, both from the core's
        grant). False if it could not be sent this way: the caller sends it through Redis."""
        try:
            address = parse_address(url)
        except InvalidRequest:
            return False
        with self._lock:
            if not self.usable(worker_id, address):
                return False
            conn = self._conns.get(worker_id)
            if conn is not None and (conn.address != address or conn.public_key != public_key):
                self._close(worker_id)
                conn = None
            try:
                if conn is None:
                    conn = self._conns[worker_id] = self._connect(address, public_key)
                frame = conn.box.encrypt(blob, _nonce(conn.base, conn.counter)).ciphertext
                conn.counter += 1
                conn.sock.sendall(_LENGTH.pack(len(frame)) + frame)
            except (OSError, ConnectionError, AzuError, CryptoError, ValueError) as exc:
                log.warning("direct path to %s at %s:%d not used (through Redis instead, for %.0f s): %s",
                            worker_id, *address, self.backoff_s, exc)
                self._close(worker_id)
                self._failed[(worker_id, address)] = time.monotonic() + self.backoff_s
                return False
            self.sent += 1
            return True

    def _connect(self, address: tuple[str, int], public_key: str) -> _Connection:
        receiver = auth.verify_key(public_key)
        sock = socket.create_connection(address, timeout=self.connect_s)
        try:
            _tune(sock)
            challenge = os.urandom(CHALLENGE_BYTES)
            sock.sendall(MAGIC + self.public + challenge)
            answer = _recv_exact(sock, _ANSWER)
            if len(answer) != _ANSWER:
                raise ConnectionError("the listener closed the connection at the hello")
            base = answer[:BASE_BYTES]
            auth.check(public_key, auth.DIRECT_HELLO, challenge + base + self.public, answer[BASE_BYTES:],
                       what=f"the direct-path hello of {address[0]}:{address[1]}")
            sock.settimeout(None)
            return _Connection(address, public_key, sock, _box(self.key, bytes(receiver)), base)
        except BaseException:
            sock.close()
            raise

    def _close(self, worker_id: str) -> None:
        conn = self._conns.pop(worker_id, None)
        if conn is not None:
            conn.sock.close()

    def close(self) -> None:
        with self._lock:
            for worker_id in list(self._conns):
                self._close(worker_id)
