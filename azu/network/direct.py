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

Limits, on the listener: ``max_connections`` open at once (when full, the oldest connection that has not
yet had a frame admitted is closed for the new one: strangers cannot lock the hop before out); one deadline
for the whole hello, one per frame once its length is read, and ``idle_s`` between frames; a frame size
cap, ``FIRST_FRAME_MAX`` until the connection has had a frame admitted; frames are checked one at a time
(``admit`` runs under one lock: it parses what a stranger sent); refusal messages cut short in the log. On
the sender: a deadline for connecting and the hello, a deadline for each send (a receiver that stops
reading cannot hold the sender), and a connection the listener closed (idle, restarted) is found before a
frame is written to it. A send that fails returns False and the caller sends that hand-over through Redis;
the address is not tried again for ``backoff_s``. A step that arrives twice (once each way, after a send
whose fate is unknown) is answered from its remembered output, as any duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
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

from azu.errors import AzuError, InvalidRequest, shown
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
FIRST_FRAME_MAX = 16 << 20  # until a frame of the connection was admitted (a prompt's chunk is far less)
MAX_CONNECTIONS = 64
HANDSHAKE_S = 10.0
IDLE_S = 300.0  # a connection with no frame this long is closed (the sender opens a new one)
FRAME_S = 10.0  # a frame's body must arrive within this, plus a second per MIN_RATE bytes
MIN_RATE = 1 << 20
CONNECT_S = 3.0
BACKOFF_S = 10.0
MAX_LOGGED = 200  # characters of a refusal's reason in the log (it may quote what a stranger sent)


def parse_address(url: str) -> tuple[str, int]:
    """``host:port`` of a P2P URL (``tcp://host:port``; any scheme, or none, is read the same way)."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise InvalidRequest(f"a P2P address must be host:port (as in tcp://10.0.0.5:8003), got {shown(url)}")
    return parts.hostname, port


def _nonce(base: bytes, counter: int) -> bytes:
    return base + counter.to_bytes(8, "big")


def _box(own: SigningKey, other_public: bytes) -> Box:
    return Box(own.to_curve25519_private_key(), VerifyKey(other_public).to_curve25519_public_key())


def _deadline_for(size: int) -> float:
    return time.monotonic() + FRAME_S + size / MIN_RATE


def _recv_exact(conn: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from ``conn`` (by ``deadline``, a monotonic time, if given: else socket.timeout); b"" if
    it closed before the first, ConnectionError if it closed midway."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {n} bytes in time")
            conn.settimeout(left)
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
                 first_frame_max: int = FIRST_FRAME_MAX, max_connections: int = MAX_CONNECTIONS,
                 handshake_s: float = HANDSHAKE_S, idle_s: float = IDLE_S) -> None:
        self.key = key
        self.public = bytes(key.verify_key)
        self.on_frame = on_frame
        self.admit = admit
        self.max_frame = max_frame
        self.first_frame_max = min(first_frame_max, max_frame)
        self.max_connections = max_connections
        self.handshake_s = handshake_s
        self.idle_s = idle_s
        self._private: PrivateKey = key.to_curve25519_private_key()
        self._sock = socket.create_server(bind, reuse_port=False)
        # Open connections -> whether one of their frames was admitted (the unproven go first when full),
        # in the order they were accepted.
        self._open: dict[socket.socket, bool] = {}
        self._lock = threading.Lock()
        self._admit_lock = threading.Lock()
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
                evict = None
                if len(self._open) >= self.max_connections:
                    evict = next((c for c, proven in self._open.items() if not proven), None)
                    if evict is not None:
                        del self._open[evict]
                full = len(self._open) >= self.max_connections
                if not full:
                    self._open[conn] = False
            if evict is not None:
                log.warning("direct path: %d connections open: the oldest with no frame admitted closed",
                            self.max_connections)
                with contextlib.suppress(OSError):
                    evict.shutdown(socket.SHUT_RDWR)
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
                self._open.pop(conn, None)
            conn.close()

    def _refuse(self, why: str) -> None:
        self.refused += 1
        log.warning("direct path: connection closed: %s", why[:MAX_LOGGED])

    def _receive(self, conn: socket.socket) -> None:
        _tune(conn)
        hello = _recv_exact(conn, _HELLO, time.monotonic() + self.handshake_s)
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
        sender_hex = sender.hex()
        counter = 0
        cap = self.first_frame_max
        while not self._stopped.is_set():
            conn.settimeout(self.idle_s)
            try:
                head = _recv_exact(conn, _LENGTH.size)
            except TimeoutError:
                return None  # idle: the sender opens a new connection when it has something to send
            if not head:
                return None
            (size,) = _LENGTH.unpack(head)
            if size > cap + BOX_OVERHEAD:
                return self._refuse(f"a frame of {size} bytes (at most {cap} now)")
            body = _recv_exact(conn, size, _deadline_for(size))
            if len(body) != size:
                return None
            try:
                plain = box.decrypt(body, _nonce(base, counter))
            except CryptoError:
                return self._refuse("a frame that does not decrypt (forged, or replayed)")
            counter += 1
            try:
                with self._admit_lock:  # one stranger's frame parsed at a time
                    admitted = self.admit(plain, sender_hex)
            except AzuError as exc:
                return self._refuse(exc.message)
            if not admitted:
                return self._refuse(f"a frame from {sender_hex[:16]}… that its grant does not name")
            if cap != self.max_frame:
                cap = self.max_frame
                with self._lock:
                    if conn in self._open:
                        self._open[conn] = True
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


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the listener closed ``sock`` (it never writes after the hello: anything readable is its end:
    idle, restarted). Found before a frame is written, which the kernel would otherwise take and lose."""
    poll = select.poll()  # not a peek: a socket with a timeout waits that long even with MSG_DONTWAIT
    poll.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poll.poll(0))  # readable: its end (b""), or bytes it should not have sent


class Connections:
    """The sending side: one connection per receiving worker, opened on first use (``send``); sends to
    different workers do not wait for each other."""

    MAX_OPEN = 64  # connections kept; the least recently used is closed beyond

    def __init__(self, key: SigningKey, *, connect_s: float = CONNECT_S, backoff_s: float = BACKOFF_S,
                 frame_s: float = FRAME_S, min_rate: float = MIN_RATE) -> None:
        self.key = key
        self.public = bytes(key.verify_key)
        self.connect_s = connect_s
        self.backoff_s = backoff_s
        self.frame_s = frame_s  # a send's deadline: this, plus a second per ``min_rate`` bytes
        self.min_rate = min_rate
        self._conns: dict[str, _Connection] = {}  # by worker, least recently used first
        self._failed: dict[tuple[str, tuple[str, int]], float] = {}  # (worker, address) -> retry after
        self._locks: dict[str, threading.Lock] = {}  # one per worker: a slow receiver holds only its own
        self._lock = threading.Lock()  # the three dicts
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
            lock = self._locks.setdefault(worker_id, threading.Lock())
        with lock:
            with self._lock:
                conn = self._conns.pop(worker_id, None)
            try:
                if conn is not None and (conn.address != address or conn.public_key != public_key
                                         or _closed_by_peer(conn.sock)):
                    conn.sock.close()
                    conn = None
                if conn is None:
                    conn = self._connect(address, public_key)
                frame = conn.box.encrypt(blob, _nonce(conn.base, conn.counter)).ciphertext
                conn.counter += 1
                conn.sock.settimeout(self.frame_s + len(frame) / self.min_rate)
                conn.sock.sendall(_LENGTH.pack(len(frame)) + frame)
            except (OSError, ConnectionError, AzuError, CryptoError, ValueError) as exc:
                log.warning("direct path to %s at %s:%d not used (through Redis instead, for %.0f s): %s",
                            worker_id, *address, self.backoff_s, str(exc)[:MAX_LOGGED])
                if conn is not None:
                    conn.sock.close()
                with self._lock:
                    now = time.monotonic()
                    self._failed = {k: t for k, t in self._failed.items() if t > now}
                    self._failed[(worker_id, address)] = now + self.backoff_s
                return False
            with self._lock:
                self._conns[worker_id] = conn  # the most recently used, last
                while len(self._conns) > self.MAX_OPEN:
                    self._conns.pop(next(iter(self._conns))).sock.close()
                self.sent += 1
            return True

    def _connect(self, address: tuple[str, int], public_key: str) -> _Connection:
        receiver = auth.verify_key(public_key)
        deadline = time.monotonic() + self.connect_s
        sock = socket.create_connection(address, timeout=self.connect_s)
        try:
            _tune(sock)
            challenge = os.urandom(CHALLENGE_BYTES)
            sock.sendall(MAGIC + self.public + challenge)
            answer = _recv_exact(sock, _ANSWER, deadline)
            if len(answer) != _ANSWER:
                raise ConnectionError("the listener closed the connection at the hello")
            base = answer[:BASE_BYTES]
            auth.check(public_key, auth.DIRECT_HELLO, challenge + base + self.public, answer[BASE_BYTES:],
                       what=f"the direct-path hello of {address[0]}:{address[1]}")
            return _Connection(address, public_key, sock, _box(self.key, bytes(receiver)), base)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.sock.close()
            self._conns.clear()
