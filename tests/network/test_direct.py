"""The direct path's transport (azu.network.direct) over real sockets: frames reach only the grant's worker,
cannot be replayed, forged or oversized, and a sender that cannot use the path says so (the caller then
goes through Redis)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from nacl.public import Box
from nacl.signing import SigningKey

from azu.network import auth, direct


class Received:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.event = threading.Event()

    def __call__(self, blob: bytes) -> None:
        self.frames.append(blob)
        self.event.set()


def listen(key: SigningKey, *, admit=None, **kwargs) -> tuple[direct.Listener, Received]:
    got = Received()
    listener = direct.Listener(key, ("127.0.0.1", 0), on_frame=got,
                               admit=admit or (lambda blob, sender: True), **kwargs).start()
    return listener, got


def url(listener: direct.Listener) -> str:
    host, port = listener.address
    return f"tcp://{host}:{port}"


def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def raw_hello(listener: direct.Listener, sender_public: bytes) -> tuple[socket.socket, bytes]:
    """A connection that says hello with ``sender_public`` (no private key needed): (socket, base)."""
    sock = socket.create_connection(listener.address, timeout=5)
    sock.sendall(direct.MAGIC + sender_public + os.urandom(direct.CHALLENGE_BYTES))
    answer = direct._recv_exact(sock, direct.BASE_BYTES + 64)
    return sock, answer[:direct.BASE_BYTES]


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_frames_reach_the_listener_in_order_encrypted_to_its_key():
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    seen_keys = []
    listener, got = listen(receiver, admit=lambda blob, key: seen_keys.append(key) or True)
    try:
        conns = direct.Connections(sender)
        blobs = [os.urandom(n) for n in (1, 3700, 460_000, 17)]
        for blob in blobs:
            assert conns.send("w2", url(listener), auth.public_hex(receiver), blob)
        assert until(lambda: len(got.frames) == len(blobs))
        assert got.frames == blobs
        assert set(seen_keys) == {auth.public_hex(sender)}  # the connection's key, for the grant check
        assert conns.sent == 4 and listener.frames == 4 and listener.refused == 0
    finally:
        conns.close()
        listener.stop()


def test_a_listener_without_the_grants_key_gets_the_hello_and_nothing_more():
    """A worker that advertised someone else's address: the listener there cannot sign the hello with the key
    the grant names, so the sender sends no frame, backs off, and the caller uses Redis."""
    impostor, named, sender = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    listener, got = listen(impostor)
    try:
        conns = direct.Connections(sender, backoff_s=60)
        assert not conns.send("w2", url(listener), auth.public_hex(named), b"the prompt, in another form")
        time.sleep(0.2)
        assert got.frames == [] and listener.frames == 0
        assert not conns.usable("w2", listener.address)
        assert not conns.send("w2", url(listener), auth.public_hex(named), b"again")  # no new connection
    finally:
        listener.stop()


def test_no_listener_means_false_and_a_back_off():
    sender = SigningKey.generate()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    conns = direct.Connections(sender, backoff_s=60, connect_s=1)
    assert not conns.send("w2", f"tcp://127.0.0.1:{port}", auth.public_hex(SigningKey.generate()), b"x")
    assert not conns.usable("w2", ("127.0.0.1", port))
    assert not conns.send("w2", "not an address", auth.public_hex(SigningKey.generate()), b"x")


def test_a_frame_replayed_on_another_connection_does_not_decrypt_and_closes_it():
    """An eavesdropper who recorded a frame says hello with the real sender's public key (a hello proves
    nothing) and sends the frame again: another connection has another nonce base."""
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    listener, got = listen(receiver)
    try:
        sock, base = raw_hello(listener, bytes(sender.verify_key))
        box = Box(sender.to_curve25519_private_key(), receiver.verify_key.to_curve25519_public_key())
        frame = box.encrypt(b"step", direct._nonce(base, 0)).ciphertext
        sock.sendall(direct._LENGTH.pack(len(frame)) + frame)  # the sender's own frame: accepted
        assert until(lambda: got.frames == [b"step"])
        sock.sendall(direct._LENGTH.pack(len(frame)) + frame)  # the same again on the same connection
        assert closed_by_peer(sock)
        again, _ = raw_hello(listener, bytes(sender.verify_key))
        again.sendall(direct._LENGTH.pack(len(frame)) + frame)  # replayed on a new connection
        assert closed_by_peer(again)
        assert got.frames == [b"step"] and listener.refused == 2
    finally:
        listener.stop()


def test_a_stranger_cannot_write_as_another_worker():
    """Frames encrypted with the stranger's own key decrypt, but the grant check (here: the one key allowed)
    refuses them and closes the connection; frames claiming the real sender's key do not decrypt."""
    receiver, sender, stranger = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    allowed = auth.public_hex(sender)
    listener, got = listen(receiver, admit=lambda blob, key: key == allowed)
    try:
        # The send goes out (the stranger holds its own key), and the listener refuses what it brings.
        assert direct.Connections(stranger).send("w2", url(listener), auth.public_hex(receiver), b"forged")
        assert until(lambda: listener.refused == 1)
        sock, base = raw_hello(listener, bytes(sender.verify_key))
        box = Box(stranger.to_curve25519_private_key(), receiver.verify_key.to_curve25519_public_key())
        frame = box.encrypt(b"forged", direct._nonce(base, 0)).ciphertext
        sock.sendall(direct._LENGTH.pack(len(frame)) + frame)
        assert closed_by_peer(sock)
        assert until(lambda: listener.refused == 2)
        assert got.frames == []
    finally:
        listener.stop()


def test_an_oversized_frame_and_a_bad_hello_close_the_connection_before_anything_is_read():
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    listener, got = listen(receiver, max_frame=1024)
    try:
        sock, _ = raw_hello(listener, bytes(sender.verify_key))
        sock.sendall(direct._LENGTH.pack(1 << 30))
        assert closed_by_peer(sock)
        bad = socket.create_connection(listener.address, timeout=5)
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        assert closed_by_peer(bad)
        assert got.frames == [] and listener.refused == 2
        conns = direct.Connections(sender)
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"y" * 1024)  # at the cap: fine
        assert until(lambda: got.frames == [b"y" * 1024])
    finally:
        listener.stop()


def test_strangers_holding_every_connection_do_not_lock_the_hop_before_out():
    """At the cap, a new connection closes the oldest one that never had a frame admitted; with only proven
    connections open, the new one is refused."""
    receiver, sender, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    listener, got = listen(receiver, max_connections=2, handshake_s=30)
    try:
        held = [socket.create_connection(listener.address, timeout=5) for _ in range(2)]
        assert until(lambda: len(listener._open) == 2)
        conns = direct.Connections(sender)
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"z")  # evicts held[0]
        assert until(lambda: got.frames == [b"z"])
        assert closed_by_peer(held[0])
        others = direct.Connections(other)  # kept: its connection stays open
        assert others.send("w3", url(listener), auth.public_hex(receiver), b"y")  # evicts held[1]
        assert until(lambda: got.frames == [b"z", b"y"])
        assert closed_by_peer(held[1])
        late = socket.create_connection(listener.address, timeout=5)
        assert closed_by_peer(late)  # both open connections are proven: the new one goes
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"x")  # still served
        assert until(lambda: got.frames == [b"z", b"y", b"x"])
    finally:
        listener.stop()


def test_a_hello_trickled_byte_by_byte_is_cut_at_its_deadline():
    """One deadline for the whole hello (a timeout per read would let a byte every 0.3 s hold it for ever)."""
    listener, _ = listen(SigningKey.generate(), handshake_s=1.0)
    try:
        sock = socket.create_connection(listener.address, timeout=5)
        started, cut_at = time.monotonic(), None
        for byte in direct.MAGIC + bytes(64):
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut_at = time.monotonic() - started
                break
            time.sleep(0.3)
            if time.monotonic() - started > 8:
                break
        assert cut_at is not None and cut_at < 4, cut_at
        assert listener.frames == 0
    finally:
        listener.stop()


def test_a_receiver_that_stops_reading_does_not_hold_the_sender():
    """The listener's end answers the hello, then never reads: the send gives up at its deadline (the caller
    goes through Redis) instead of blocking the worker."""
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []

    def answer_hello_then_sleep() -> None:
        conn, _ = server.accept()
        accepted.append(conn)
        hello = direct._recv_exact(conn, direct._HELLO)
        base = os.urandom(direct.BASE_BYTES)
        conn.sendall(base + auth.sign(receiver, auth.DIRECT_HELLO, hello[-32:] + base + hello[-64:-32]))

    threading.Thread(target=answer_hello_then_sleep, daemon=True).start()
    conns = direct.Connections(sender, frame_s=0.5, min_rate=1 << 30)
    try:
        started = time.monotonic()
        results = [conns.send("w2", f"tcp://127.0.0.1:{port}", auth.public_hex(receiver), os.urandom(4 << 20))
                   for _ in range(8)]
        assert not all(results)  # the kernel's buffers take a few; then a send gives up
        assert time.monotonic() - started < 10
        assert not conns.usable("w2", ("127.0.0.1", port))
    finally:
        for c in accepted:
            c.close()
        server.close()


def test_a_restarted_or_idle_closed_listener_is_found_before_a_frame_is_lost():
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    listener, got = listen(receiver, idle_s=0.5)
    conns = direct.Connections(sender)
    try:
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"one")
        assert until(lambda: got.frames == [b"one"])
        time.sleep(1.0)  # the listener closes the idle connection
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"two")  # on a new connection
        assert until(lambda: got.frames == [b"one", b"two"])
        host, port = listener.address
        listener.stop()
        again = Received()  # the same worker back at the same address: the old connection is dead
        restarted = direct.Listener(receiver, (host, port), on_frame=again, admit=lambda b, k: True).start()
        try:
            assert conns.send("w2", url(restarted), auth.public_hex(receiver), b"three")
            assert until(lambda: again.frames == [b"three"])
        finally:
            restarted.stop()
    finally:
        conns.close()
        listener.stop()


def test_the_first_frame_of_a_connection_is_capped_lower():
    receiver, sender = SigningKey.generate(), SigningKey.generate()
    listener, got = listen(receiver, first_frame_max=1024, max_frame=4096)
    try:
        conns = direct.Connections(sender)
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"a" * 2048)  # sent, then refused
        assert until(lambda: listener.refused == 1) and got.frames == []
        conns = direct.Connections(sender)
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"b" * 1000)
        assert conns.send("w2", url(listener), auth.public_hex(receiver), b"c" * 4000)  # proven: up to 4096
        assert until(lambda: got.frames == [b"b" * 1000, b"c" * 4000])
    finally:
        listener.stop()


@pytest.mark.parametrize("text,expected", [("tcp://10.0.0.5:8003", ("10.0.0.5", 8003)),
                                           ("http://w4.example:8003", ("w4.example", 8003)),
                                           ("127.0.0.1:9", ("127.0.0.1", 9))])
def test_p2p_addresses(text, expected):
    assert direct.parse_address(text) == expected


def test_no_hand_over_goes_directly_past_one_still_queued_for_redis(r):
    """A worker whose earlier hand-over to B still waits on the outbox for Redis (after a failed direct send,
    say) sends the next one through Redis too: directly, it would overtake the earlier one (a prompt's later
    part before its earlier ones is dropped). Once those went out, the direct path is used again."""
    from azu.engine.span import Span
    from azu.network.node import WorkerNode
    from azu.network.wire import Hop, JobGrant, Sampling, StepPayload

    receiver = SigningKey.generate()
    listener, got = listen(receiver)
    node = WorkerNode(r, worker_id="wa", dispatch=None, linger_s=0, background_sends=True)  # type: ignore[arg-type]
    try:
        grant = JobGrant(job_id="j", model_id="m", manifest_sha256="",
                         route=(Hop("wa", Span(0, 2, True, False)), Hop("wb", Span(2, 4, False, True))),
                         public_keys=(node.public_key, auth.public_hex(receiver)),
                         sampling=Sampling(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=(),
                                           stop_ids=(), prompt_len=3),
                         epoch=0, expires_at=1e10, direct=("", url(listener))).pack()
        step = StepPayload(job_id="j", step=0, hop=1, pos=0, x=b"x", grant=grant, grant_sig=b"s" * 64)
        node._queued_for_redis["wb"] = 1  # an earlier hand-over to wb waits for Redis
        assert node._send_direct({"wb": b"bundle"}, [step]) == set()
        assert listener.frames == 0
        node._queued_for_redis.clear()  # it went out
        assert node._send_direct({"wb": b"bundle"}, [step]) == {"wb"}
        assert until(lambda: got.frames == [b"bundle"])
    finally:
        node.connections.close()
        listener.stop()
