"""Decode graphs (azu.engine.graphs): the static one-token step a CUDA graph records gives generate's tokens,
through room growths, spares, batches and eager steps in between; and it makes no host sync, so it can be
recorded. No GPU here: ``graphs="on"`` runs the same static step eagerly on the CPU (what a GPU records)."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from azu.engine import graphs
from azu.engine import stage as stage_module
from azu.engine.kvcache import BatchRows
from azu.engine.local import LocalPipeline
from azu.engine.stage import Stage
from azu.errors import InvalidRequest
from tests.support.engine import NEW_TOKENS, PROMPT_LEN, decode_together

# Families whose stages take the static step (explicit positions, full attention; azu.engine.stage).
GRAPHED = ["llama", "qwen2", "phi", "phi3", "gemma", "qwen2_moe", "deepseek_v2"]
# Ops that wait for the device (a value read on the host): a recording cannot hold them.
HOST_SYNCS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.equal",
              "aten.allclose", "aten.unique", "aten._unique2", "aten.masked_select"}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _spares_are_nobodys(stage: Stage) -> None:
    """No spare's rooms are a job's cache (a job adopting it would write over that job's keys)."""
    spare = {id(k) for g in stage._spare_graphs for k, _ in g.rooms.values()}
    for job in stage._jobs.values():
        for idx in range(stage.span.first, stage.span.last):
            room = getattr(job.cache.layers[idx], "_room", None)
            assert room is None or id(room[0]) not in spare


def _count_graphs(monkeypatch) -> list[int]:
    """The rows of every decode graph the stages make from now on (each one a recording on a GPU)."""
    made: list[int] = []

    class Counted(graphs.DecodeGraph):
        def __init__(self, rooms, x) -> None:
            made.append(int(x.shape[0]))
            super().__init__(rooms, x)

    monkeypatch.setattr(stage_module, "DecodeGraph", Counted)
    return made


def _small_rooms(monkeypatch, extra: int = 9) -> None:
    """Rooms ``extra`` positions longer than asked: with 9, a 40-token prompt's 24 steps move the job through
    three graphs (rooms of 50, 60 and 70 positions)."""
    monkeypatch.setattr(stage_module, "room_for", lambda positions, limit: positions + extra)


@pytest.mark.parametrize("family", GRAPHED)
def test_static_steps_give_generates_tokens(built, family, monkeypatch) -> None:
    _small_rooms(monkeypatch)
    b = built(family)
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    graphed = [stage for stage in pipe.stages if stage._graphs_on]
    assert graphed, f"no {family} stage takes the static step"
    assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == b.reference()
    # Every graphed stage kept the ended job's graphs, those it moved out of first, as spares.
    for stage in graphed:
        assert [g.room for g in stage._spare_graphs] == [50, 60, 70]


@pytest.mark.parametrize("family", GRAPHED)
def test_batch_graphs_give_each_jobs_own_tokens(built, family, monkeypatch) -> None:
    """Jobs decoding together as one batch decode graph (forced on the CPU: ``replay_rows`` 0): each gets
    its own greedy tokens through rows that fill and move to longer rooms (3 jobs in rows padded to 4), a job
    leaving the batch for a step alone and coming back, another job's prompt arriving (eager) and the job
    joining the batch."""
    _small_rooms(monkeypatch, 5)
    b = built(family)
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    prompts = {"a": b.prompt(), "b": b.prompt()[:23], "c": b.prompt()[:31], "d": b.prompt()[:12]}
    want = {k: plain.generate(p, max_tokens=NEW_TOKENS).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(prompts[k])).argmax())]) for k in "abc"}
    got = {k: [int(x)] for k, x in nxt.items()}
    graphed = [stage for stage in pipe.stages if stage._graphs_on]
    assert graphed, f"no {family} stage takes the static step"
    # The graphs themselves, held: an id of a graph already freed can come back for a new one (CPython reuses
    # addresses), and a set of ids then counted two graphs as one (7 of 8, once in CI).
    seen: dict[int, object] = {}

    def one_batch_graph(stage, keys) -> None:
        if stage._graphs_on:
            rows = stage._jobs[keys[0]].rows
            # Padded to a batch size a stage records (rows_for): 3 jobs in 4 rows, the last one padding.
            assert rows is not None and rows.graph is not None and rows.size == graphs.rows_for(len(keys))
            assert len(rows.members) == len(keys)
            assert all(stage._jobs[k].rows is rows for k in keys)
            seen[id(rows.graph)] = rows.graph

    for step in range(NEW_TOKENS - 1):
        keys = ["a", "b", "c"] if step < 14 else ["a", "b", "c", "d"]
        if step == 6:  # "b" runs a step alone (it leaves the rows), then rejoins
            nxt["b"] = torch.tensor([int(pipe.step("b", nxt["b"]).argmax())])
            got["b"].append(int(nxt["b"]))
            keys = ["a", "c"]
        if step == 10:  # "d" arrives: its prompt runs eagerly, then it decodes with the others
            nxt["d"] = torch.tensor([int(pipe.step("d", torch.tensor(prompts["d"])).argmax())])
            got["d"] = [int(nxt["d"])]
        decode_together(pipe.stages, keys, nxt, got, lambda stage, keys=keys: one_batch_graph(stage, keys))
    assert {k: got[k][: len(want[k])] for k in "abc"} == {k: want[k][: len(got[k])] for k in "abc"}
    assert got["d"] == want["d"][: len(got["d"])] and len(got["d"]) == 10
    assert all(len(got[k]) >= NEW_TOKENS - 1 for k in "abc")
    # New rows a stage made: for 3 jobs, 2, 3 again, 4 jobs, and each time the rows filled their room.
    assert len(seen) >= 4 * len(graphed)


@pytest.mark.parametrize("family", GRAPHED)
def test_the_static_step_makes_no_host_sync(built, family) -> None:
    """What a CUDA graph records must not read a value on the host: check every op the step dispatches."""
    b = built(family)
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    x = torch.tensor(b.prompt())
    for stage in pipe.stages:
        x = stage.forward("j", x)
    token = torch.tensor([int(x.argmax())])
    for stage in pipe.stages:
        if not stage._graphs_on:
            token = stage.forward("j", token)
            continue
        job = stage._jobs["j"]
        graph = stage._graph_for(job, job.length + 1)
        assert graph is not None
        graph.x.copy_(token.view_as(graph.x) if stage.span.embeddings else token.to(graph.x.dtype))
        graph.pos.fill_(job.length)
        with torch.inference_mode(), _Ops() as ops:
            out = stage._static_forward(graph)
        assert not ops.seen & HOST_SYNCS, f"{family} stage {stage.span}: {sorted(ops.seen & HOST_SYNCS)}"
        assert "aten.index_copy_" in ops.seen or "aten.index_copy" in ops.seen  # the step's column, in place
        token = out[0] if not stage.span.head else token


@pytest.mark.parametrize("family", GRAPHED)
def test_the_batch_static_step_makes_no_host_sync(built, family) -> None:
    """The same for a batch decode graph's step (three jobs' rows, at different positions, and a pad row)."""
    b = built(family)
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    keys = ["a", "b", "c"]
    xs = {k: torch.tensor(b.prompt()[: 6 + 3 * i]) for i, k in enumerate(keys)}
    for stage in pipe.stages:
        xs = {k: stage.forward(k, x) for k, x in xs.items()}
    xs = {k: torch.tensor([int(x.argmax())]) for k, x in xs.items()}
    for stage in pipe.stages:
        if not stage._graphs_on:
            xs = {k: stage.forward(k, x) for k, x in xs.items()}
            continue
        jobs = [stage._jobs[k] for k in keys]
        graph = stage._rows_graph(jobs)
        assert graph is not None and graph.rows == 4 and all(job.rows is jobs[0].rows for job in jobs)
        graph.x[:3].copy_(torch.cat([xs[k] for k in keys]).view_as(graph.x[:3]))
        graph.pos.copy_(torch.tensor([job.length for job in jobs] + [jobs[0].length]))
        with torch.inference_mode(), _Ops() as ops:
            out = stage._static_forward(graph)
        assert not ops.seen & HOST_SYNCS, f"{family} stage {stage.span}: {sorted(ops.seen & HOST_SYNCS)}"
        assert "aten.index_put_" in ops.seen  # each row's column, in place
        if not stage.span.head:
            xs = {k: out[i] for i, k in enumerate(keys)}


def test_jobs_share_spares_and_move_between_graphs_batches_and_eager_steps(built, monkeypatch) -> None:
    """Two jobs: alone (each its own graph), as one batch (rows: their graphs go to the spares), alone again
    (each moves into a spare's rooms, no recording), a prompt chunk between decode steps (eager, in place),
    and after they end a third job takes a spare. Tokens: each job's own greedy run."""
    _small_rooms(monkeypatch, 16)
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    prompts = {"a": b.prompt(), "b": b.prompt()[:17]}
    want = {k: plain.generate(p, max_tokens=NEW_TOKENS).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor(p) for k, p in prompts.items()}
    got: dict[str, list[int]] = {k: [] for k in prompts}

    def alone(k: str) -> None:
        x = nxt[k]
        for stage in pipe.stages:
            x = stage.forward(k, x)
            _spares_are_nobodys(stage)
        nxt[k] = torch.tensor([int(x.argmax())])
        got[k].append(int(nxt[k]))

    def together() -> None:
        decode_together(pipe.stages, ["a", "b"], nxt, got)

    for _ in range(4):
        alone("a")
        alone("b")
    recorded = {k: pipe.stages[0]._jobs[k].graph for k in prompts}
    assert all(recorded.values()) and recorded["a"] is not recorded["b"]
    for _ in range(6):
        together()
        # In rows, a job holds no graph: its graph's rooms would hold its positions a second time.
        assert all(pipe.stages[0]._jobs[k].graph is None for k in prompts)
        assert {id(g) for g in recorded.values()} <= {id(g) for g in pipe.stages[0]._spare_graphs}
    for _ in range(5):
        alone("a")
        alone("b")
    # Back from the batch: each job took one of the spares (both still fit them), nothing was recorded.
    assert {id(pipe.stages[0]._jobs[k].graph) for k in prompts} == {id(g) for g in recorded.values()}
    for _ in range(NEW_TOKENS - 15):
        alone("a")
        alone("b")
    assert got == want
    assert pipe.stages[0].kv_cache_bytes() > 0
    for stage in pipe.stages:
        stage.end_job("a")
        stage.end_job("b")
        assert len(stage._spare_graphs) <= graphs.SPARES
        assert sum(g.room for g in stage._spare_graphs) <= graphs.SPARE_POSITIONS
    spares = list(pipe.stages[0]._spare_graphs)
    # A new job takes a spare whose room fits it: no new graph.
    third = pipe.generate(prompts["b"], max_tokens=4).token_ids
    assert third == want["b"][:4]
    assert all(g in spares for g in pipe.stages[0]._spare_graphs)


def test_small_batches_run_as_one_replay_per_job_and_a_warm_up_leaves_a_spare(built, monkeypatch) -> None:
    """On a GPU a batch of a few one-token steps runs as replays, one per job (``replay_rows``), the first
    time its jobs meet, where they have graphs or spares (at most one recording); from their second batch
    together, as one batch decode graph. A stage records its first graph when it loads (``warm_graphs``),
    then a throwaway batch decode graph of each of ``WARM_BATCH_ROWS`` rows. All forced here on the CPU."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    made = _count_graphs(monkeypatch)
    for stage in pipe.stages:
        stage.replay_rows = 16  # a GPU's
        made.clear()
        stage.warm_graphs()
        # The 1-row warm-up's graph, kept as a spare, then a batch graph of each size (the throwaway jobs'
        # first steps, an eager batch, put them in rows), thrown away.
        assert made == [1, *graphs.WARM_BATCH_ROWS]
        assert len(stage._spare_graphs) == 1 and not stage.jobs and stage.cached_tokens == 0
        stage.replay_rows = 2
    prompts = {"a": b.prompt(), "b": b.prompt()[:17], "c": b.prompt()[:9]}
    want = {k: plain.generate(p, max_tokens=8).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in prompts.items()}
    got = {k: [int(x)] for k, x in nxt.items()}
    for step in range(7):
        # 2 rows: replays, then (the same jobs again) a batch decode graph; 3 rows: a batch decode graph.
        keys = ["a", "b"] if step < 4 else ["a", "b", "c"]

        def in_rows_if_batched(stage: Stage, keys: list[str] = keys, step: int = step) -> None:
            batched = len(keys) > 2 or step > 0
            assert [stage._jobs[k].rows is not None for k in keys] == [batched] * len(keys)
            assert [stage._jobs[k].graph is not None for k in keys] == [not batched] * len(keys)

        decode_together(pipe.stages, keys, nxt, got, in_rows_if_batched)
    assert got["a"] == want["a"] and got["b"] == want["b"] and got["c"] == want["c"][:4]


def test_fresh_jobs_meet_in_one_batch_graph_not_a_recording_each(built, monkeypatch) -> None:
    """A GPU's few jobs (up to ``replay_rows``) that meet the first time run as replays only where that
    records one graph at most (their own graphs, spares); jobs fresh from their prompts, more than the spares,
    record one batch decode graph for all of them instead of one graph each."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    made = _count_graphs(monkeypatch)
    prompts = {"a": b.prompt(), "b": b.prompt()[:17], "c": b.prompt()[:9], "d": b.prompt()[:12]}
    want = {k: plain.generate(p, max_tokens=6).token_ids for k, p in prompts.items()}
    for stage in pipe.stages:
        stage.replay_rows = 16  # a GPU's
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in prompts.items()}
    got = {k: [int(x)] for k, x in nxt.items()}
    assert made == []  # prompts run eagerly
    keys = ["a", "b", "c"]

    def in_rows(stage: Stage) -> None:
        assert all(stage._jobs[k].rows is not None and stage._jobs[k].graph is None for k in keys)

    decode_together(pipe.stages, keys, nxt, got, in_rows)
    assert made == [4, 4]  # one batch graph a stage (3 rows and a pad row), not three graphs of one row each
    for _ in range(4):
        decode_together(pipe.stages, keys, nxt, got, in_rows)
    assert made == [4, 4]  # replayed
    for k in keys:
        assert got[k] == want[k][: len(got[k])]

    # With a spare for all but one of them, replays (one recording at most), as before.
    made.clear()
    for stage in pipe.stages:
        for k in keys:
            stage.end_job(k)  # their batch's rows go; no graph of one row comes of them
        stage._spare_graphs = stage._spare_graphs[:0]
    lone = {"e": b.prompt()[:10], "f": b.prompt()[:11]}
    nxt.update({k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in lone.items()})
    got.update({k: [int(nxt[k])] for k in lone})
    for k in ["e", "d"]:  # alone: each records a graph of its own, kept as a spare when it ends
        decode_together(pipe.stages, [k], nxt, got)
    assert made == [1, 1, 1, 1]
    for stage in pipe.stages:
        stage.end_job("e")
        assert len(stage._spare_graphs) == 1
    made.clear()
    both = ["d", "f"]  # d has its graph, f takes the spare: replays, nothing recorded

    def replays(stage: Stage) -> None:
        assert all(stage._jobs[k].rows is None and stage._jobs[k].graph is not None for k in both)

    decode_together(pipe.stages, both, nxt, got, replays)
    assert made == []
    assert got["d"] == want["d"][: len(got["d"])]
    assert got["f"] == plain.generate(lone["f"], max_tokens=len(got["f"])).token_ids


def test_no_memory_for_a_graph_leaves_the_step_eager_and_the_cache_whole(built, monkeypatch) -> None:
    """A graph's rooms that cannot be allocated (a GPU out of memory) cost the step its graph, not the job:
    it runs eagerly on the job's own cache, and the graph it outgrew does not become a spare under it."""
    _small_rooms(monkeypatch, 2)
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    want = plain.generate(b.prompt(), max_tokens=12).token_ids
    x = torch.tensor(b.prompt())
    got = []
    new_zeros = torch.Tensor.new_zeros
    refused: list[int] = []
    for step in range(12):
        if step == 5:  # from here on no new room can be had; the jobs' graphs fill up two steps later
            def no_memory(self, *args, **kwargs):
                refused.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory (a test)")
            monkeypatch.setattr(torch.Tensor, "new_zeros", no_memory)
        for stage in pipe.stages:
            x = stage.forward("j", x)
            _spares_are_nobodys(stage)
        got.append(int(x.argmax()))
        x = torch.tensor([got[-1]])
    monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
    assert got == want
    # One try a stage, then none for RETRY_AFTER_OOM_S (a try a step would flush the allocator each step).
    assert len(refused) == len(pipe.stages) and all(s._no_new_graphs_until > 0 for s in pipe.stages)


def test_batched_jobs_hold_no_graph_rooms_beside_their_rows(built) -> None:
    """Jobs that leave their graphs for a batch's rows hand the graphs to the spares (bounded): kept by the
    jobs, 8 batched jobs held their positions twice over, in the rows and in 8 idle rooms."""
    b = built("llama")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    keys = [f"j{i}" for i in range(8)]
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(b.prompt()[: 9 + i])).argmax())])
           for i, k in enumerate(keys)}
    got: dict[str, list[int]] = {k: [] for k in keys}
    for k in keys:  # one step alone each: every job gets a graph
        nxt[k] = torch.tensor([int(pipe.step(k, nxt[k]).argmax())])
    assert all(pipe.stages[0]._jobs[k].graph is not None for k in keys)
    for _ in range(3):
        decode_together(pipe.stages, keys, nxt, got)
    for stage in pipe.stages:
        jobs = [stage._jobs[k] for k in keys]
        assert all(job.graph is None and job.rows is jobs[0].rows for job in jobs)
        assert len(stage._spare_graphs) <= graphs.SPARES
        # What the stage holds: the rows and the spares, nothing beside them.
        rows = jobs[0].rows
        held = [*rows.keys.values(), *rows.values.values(),
                *(t for g in stage._spare_graphs for pair in g.rooms.values() for t in pair)]
        assert stage.kv_cache_bytes() == sum(t.untyped_storage().nbytes() for t in held)


def test_out_of_memory_pauses_new_graphs_and_other_recording_failures_end_them(built, monkeypatch) -> None:
    """Out of device memory (for rooms, or while recording): no new graph is tried for RETRY_AFTER_OOM_S
    (every try would fail and flush the allocator's cache), then graphs come back. A recording that fails
    otherwise is the step's own code: graphs end on that stage. Tokens stay generate's throughout."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    want = plain.generate(b.prompt(), max_tokens=12).token_ids
    stage = pipe.stages[0]
    stage._records = True  # as on a GPU; the "recording" below is the test's
    tries: list[str] = []
    failure: list[BaseException] = [torch.OutOfMemoryError("CUDA out of memory (a test)")]

    def record(graph, position) -> None:
        tries.append("record")
        if failure:
            raise failure[0]

    monkeypatch.setattr(stage, "_record", record)
    x, got = torch.tensor(b.prompt()), []
    for step in range(12):
        if step == 4:  # the pause is over; the next recording fails for another reason
            assert tries == ["record"] and stage._graphs_on and stage._jobs["j"].graph is None
            stage._no_new_graphs_until = 0.0
            failure[0] = RuntimeError("operation not permitted when stream is capturing (a test)")
        if step == 7:
            assert tries == ["record", "record"] and not stage._graphs_on
        x = pipe.step("j", x)
        got.append(int(x.argmax()))
        x = torch.tensor([got[-1]])
    assert got == want and tries == ["record", "record"]
    assert all(s._jobs["j"].graph is not None for s in pipe.stages[1:] if s._graphs_on)


def test_batch_graphs_that_fail_to_record_leave_eager_batches_then_end(built, monkeypatch) -> None:
    """A batch decode graph whose recording fails (not for memory): the batch runs eagerly on the rows just
    made, and after BATCH_GRAPH_FAILURES such failures the stage makes no more (its jobs' own graphs stay)."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    stage = pipe.stages[0]
    stage._records = True
    tries: list[int] = []

    def record(graph, positions) -> None:
        tries.append(graph.rows)
        if graph.rows > 1:
            raise RuntimeError("operation not permitted when stream is capturing (a test)")

    monkeypatch.setattr(stage, "_record", record)
    prompts = {"a": b.prompt(), "b": b.prompt()[:17]}
    want = {k: plain.generate(p, max_tokens=10).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in prompts.items()}
    got = {k: [int(x)] for k, x in nxt.items()}
    for _ in range(9):
        decode_together(pipe.stages, ["a", "b"], nxt, got)
    assert got == want
    assert tries == [2] * graphs.BATCH_GRAPH_FAILURES and not stage._batch_graphs and stage._graphs_on
    pipe.step("a", nxt["a"])  # alone: its own graph, recorded
    assert tries[-1] == 1 and stage._jobs["a"].graph is not None


def test_batch_graph_steps_keep_no_autograd_history(built) -> None:
    """A worker calls forward_batch with autograd on (its thread's default): a batch graph's step must not
    record history (each step's graph would stay alive through the rows, and on a GPU a recording under
    autograd keeps every saved activation in the graph pool). Found by this round's review."""
    assert torch.is_grad_enabled()
    stage = LocalPipeline(built("llama").shards, 2, graphs="on").stages[0]
    keys = ["a", "b", "c"]
    for i, k in enumerate(keys):
        stage.forward(k, torch.arange(7, 12 + i))
    for step in range(3):
        outs = stage.forward_batch([(k, torch.tensor([20 + step])) for k in keys])
        assert not any(out.requires_grad for out in outs)
    rows = stage._jobs["a"].rows
    assert rows is not None and rows.graph is not None
    buffers = [*rows.keys.values(), *rows.values.values()]
    assert not any(t.requires_grad or t.grad_fn is not None for t in buffers)


def test_rows_that_grow_in_an_eager_batch_drop_their_graph(built) -> None:
    """An eager batch on a batch graph's rows (a prompt chunk beside decode steps) that grows them past the
    graph's room: the graph goes with the old buffers (kept, it held them unseen by kv_cache_bytes)."""
    stage = LocalPipeline(built("llama").shards, 2, graphs="on").stages[0]
    for k in "ab":
        stage.forward(k, torch.arange(7, 47))
    for step in range(2):
        stage.forward_batch([("a", torch.tensor([11 + step])), ("b", torch.tensor([12 + step]))])
    rows = stage._jobs["a"].rows
    assert rows is not None and rows.graph is not None and rows.graph.room == graphs.MIN_ROOM
    stage.forward_batch([("a", torch.tensor([13])), ("b", torch.arange(7, 237) % 300 + 7)])
    rows = stage._jobs["a"].rows
    assert rows is not None and rows.graph is None and rows.keys[stage.span.first].shape[2] > graphs.MIN_ROOM


def test_a_job_whose_copy_out_of_rows_fails_stays_whole(built, monkeypatch) -> None:
    """Jobs left in rows that a new batch replaces each take a copy of their row; one that finds no memory
    partway must stay whole in its rows (before, it kept its length with some layers' caches empty, and its
    next tokens were wrong without an error). Found by this round's review."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    stage = pipe.stages[1]
    for p in (plain, pipe):
        for k, n in zip("abe", (10, 11, 12), strict=True):
            p.step(k, torch.tensor(b.prompt()[:n]))
        for _ in range(2):
            xs = [(k, torch.tensor([20])) for k in "abe"]
            for st in p.stages:
                xs = list(zip("abe", st.forward_batch(xs), strict=True))
    assert stage._jobs["e"].rows is not None
    clone = torch.Tensor.clone
    copies: list[int] = []

    def second_copy_fails(self, *args, **kwargs):
        copies.append(1)
        if len(copies) == 3:  # job e's second layer (its keys, then values, a layer)
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return clone(self, *args, **kwargs)

    hidden = torch.randn(2, stage.manifest.hidden_size, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.Tensor, "clone", second_copy_fails)
    with pytest.raises(torch.OutOfMemoryError):
        stage.forward_batch([("a", hidden[:1]), ("b", hidden[1:])])  # new rows for a, b: e must leave
    monkeypatch.setattr(torch.Tensor, "clone", clone)
    assert stage._jobs["e"].rows is not None  # still in its old rows, whole
    x = torch.tensor([30])
    for st_plain, st in zip(plain.stages, pipe.stages, strict=True):
        want, x = st_plain.forward("e", x), st.forward("e", x)
        torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-5)


def test_nan_rows_sent_for_one_job_reach_no_other_job_of_its_batch_graph(built) -> None:
    """A worker upstream can send one job NaN or infinite hidden states: through a batch decode graph (rows
    side by side, masked columns read) the other jobs' outputs stay what the eager stage gives them."""
    shards = built("llama").shards
    plain = LocalPipeline(shards, 2, graphs="off").stages[1]
    stage = LocalPipeline(shards, 2, graphs="on").stages[1]  # hidden rows in, logits out
    gen = torch.Generator().manual_seed(0)
    hidden = stage.manifest.hidden_size
    for k, n in zip("abc", (4, 7, 9), strict=True):
        x = torch.randn(n, hidden, generator=gen)
        plain.forward(k, x)
        stage.forward(k, x)
    for step in range(4):
        clean = {k: torch.randn(1, hidden, generator=gen) for k in "bc"}
        poison = torch.full((1, hidden), float("nan") if step % 2 else float("inf"))
        outs = stage.forward_batch([("a", poison), ("b", clean["b"]), ("c", clean["c"])])
        assert stage._jobs["a"].rows is not None and stage._jobs["a"].rows.graph is not None
        for k, out in zip("bc", outs[1:], strict=True):
            torch.testing.assert_close(out, plain.forward(k, clean[k]), rtol=1e-4, atol=1e-5)


def test_a_job_taking_a_spare_reads_nothing_of_its_last_job(built) -> None:
    """A worker upstream can send NaN rows: the job they poison writes NaN keys and values into its room.
    When it ends and its graph serves another job, the columns after that job's positions (masked, but read:
    0 x NaN is NaN) must not hold them."""
    stage = LocalPipeline(built("llama").shards, 2, graphs="on").stages[1]  # hidden rows in, logits out
    hidden = stage.manifest.hidden_size
    gen = torch.Generator().manual_seed(0)
    stage.forward("a", torch.randn(4, hidden, generator=gen))
    for _ in range(3):
        stage.forward("a", torch.full((1, hidden), float("nan")))
    poisoned = stage._jobs["a"].graph
    stage.end_job("a")
    stage.forward("b", torch.randn(2, hidden, generator=gen))
    out = stage.forward("b", torch.randn(1, hidden, generator=gen))
    assert stage._jobs["b"].graph is poisoned and bool(torch.isfinite(out).all())


def test_a_long_prompt_chunk_after_graphed_steps_writes_in_place(built) -> None:
    """Eager steps (a chunk of several tokens) between graphed ones read and write the same cache: the
    graph's views are brought up to date first."""
    b = built("qwen2")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    prompt = b.prompt()
    for p in (plain, pipe):
        x = torch.tensor(prompt[:5])
        for step in range(8):
            x = p.step("j", x)
            x = torch.tensor([int(x.argmax())]) if step != 3 else torch.tensor(prompt[5:PROMPT_LEN])
    # Equal up to rounding: the static step attends over its whole room (masked), a sum of another length.
    want, got = plain.step("j", torch.tensor([7])), pipe.step("j", torch.tensor([7]))
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5) and int(want.argmax()) == int(got.argmax())


def test_the_setting_is_checked(built) -> None:
    b = built("llama")
    from azu.config import Settings, SettingsError
    from azu.engine.span import Span

    assert Settings.from_env({}).worker.decode_graphs == "auto"
    assert Settings.from_env({"AZU_DECODE_GRAPHS": "OFF"}).worker.decode_graphs == "off"
    with pytest.raises(SettingsError, match="AZU_DECODE_GRAPHS"):
        Settings.from_env({"AZU_DECODE_GRAPHS": "yes"})

    with pytest.raises(InvalidRequest, match="decode graphs"):
        Stage.load(b.shards, Span(0, 1, embeddings=True), graphs="always")
    # On a CPU "auto" keeps the eager step.
    assert not Stage.load(b.shards, Span(0, 1, embeddings=True))._graphs_on


def test_batch_graphs_are_padded_to_a_few_sizes() -> None:
    assert [graphs.rows_for(n) for n in (2, 3, 4, 5, 8, 9, 16, 17, 41)] == [2, 4, 4, 8, 8, 16, 16, 24, 48]
    assert all(graphs.rows_for(n) == n for n in graphs.WARM_BATCH_ROWS)  # the sizes warmed are padded sizes


def test_eager_batches_beside_padded_rows_run_on_rows_of_their_jobs_alone(built) -> None:
    """Jobs in a batch decode graph's padded rows (3 in 4); the same three as an eager batch (rows of their
    own, copied out of the padded ones); a step with another job's prompt chunk beside theirs (an eager
    batch); then all four as a batch graph: every job its own greedy tokens."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    prompts = {"a": b.prompt(), "b": b.prompt()[:17], "c": b.prompt()[:9], "d": b.prompt()[:12]}
    want = {k: plain.generate(p, max_tokens=10).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(prompts[k])).argmax())]) for k in "abc"}
    got = {k: [int(x)] for k, x in nxt.items()}
    for _ in range(3):
        decode_together(pipe.stages, ["a", "b", "c"], nxt, got)
    for stage in pipe.stages:
        assert stage._jobs["a"].rows is not None and stage._jobs["a"].rows.size == 4
        stage._batch_graphs = False  # the same three as an eager batch: on rows of their own, not the padded
    decode_together(pipe.stages, ["a", "b", "c"], nxt, got)
    for stage in pipe.stages:
        rows = stage._jobs["a"].rows
        assert rows is not None and rows.graph is None and rows.size == 3
        stage._batch_graphs = True
    nxt["d"], got["d"] = torch.tensor(prompts["d"]), []
    decode_together(pipe.stages, ["a", "b", "c", "d"], nxt, got)  # d's prompt beside their one-token steps
    for _ in range(4):
        decode_together(pipe.stages, ["a", "b", "c", "d"], nxt, got)
    for stage in pipe.stages:
        rows = stage._jobs["d"].rows
        assert rows is not None and rows.graph is not None and rows.size == 4 and len(rows.members) == 4
    for k in "abcd":
        assert got[k] == want[k][: len(got[k])]


def test_pad_rows_without_memory_leave_rows_of_the_jobs_alone(built, monkeypatch) -> None:
    """Padded rooms that find no device memory: the batch graph takes rows of its jobs alone (no pause of
    the stage's graphs); only rooms of that size failing too pause them."""
    b = built("llama")
    plain = LocalPipeline(b.shards, 2, graphs="off")
    pipe = LocalPipeline(b.shards, 2, graphs="on")
    prompts = {"a": b.prompt(), "b": b.prompt()[:17], "c": b.prompt()[:9]}
    want = {k: plain.generate(p, max_tokens=6).token_ids for k, p in prompts.items()}
    nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in prompts.items()}
    got = {k: [int(x)] for k, x in nxt.items()}
    make = BatchRows.make

    def no_memory_for_pads(self, layers, room):
        if self.size > len([p for p in self._pasts if p is not None]):
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return make(self, layers, room)

    monkeypatch.setattr(BatchRows, "make", no_memory_for_pads)
    for _ in range(4):
        decode_together(pipe.stages, list(prompts), nxt, got)
    for stage in pipe.stages:
        rows = stage._jobs["a"].rows
        assert rows is not None and rows.graph is not None and rows.size == 3
        assert stage._no_new_graphs_until == 0
    for k in prompts:
        assert got[k] == want[k][: len(got[k])]


def test_the_warm_up_stops_where_graphs_end_or_jobs_would_not_fit(built, monkeypatch) -> None:
    b = built("llama")
    made = _count_graphs(monkeypatch)
    stage = LocalPipeline(b.shards, 2, graphs="on").stages[0]
    stage.max_cached_tokens = 3 * 8  # room for the throwaway jobs of up to 8 rows
    stage.warm_graphs()
    assert made == [1, 2, 4, 8] and not stage.jobs
    made.clear()
    stage.max_cached_tokens = 32768
    stage._batch_graphs = False  # (three failed recordings, say)
    stage._spare_graphs.clear()
    stage.warm_graphs()
    assert made == [1] and not stage.jobs
    made.clear()
    stage._batch_graphs = True
    stage._no_new_graphs_until = time.monotonic() + 60  # out of memory a moment ago
    stage._spare_graphs.clear()
    stage.warm_graphs()
    assert made == [] and not stage.jobs


def test_rooms_are_powers_of_two_within_the_context() -> None:
    assert graphs.room_for(1, 4096) == graphs.MIN_ROOM
    assert graphs.room_for(graphs.MIN_ROOM + 1, 4096) == 2 * graphs.MIN_ROOM
    assert graphs.room_for(3000, 4096) == 4096
    assert graphs.room_for(3000, 3500) == 3500
    assert graphs.room_for(5000, 4096) == 5000  # past the context (refused by admission anyway)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a GPU (bench/gpu.sh)")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_recorded_graphs_on_a_gpu_give_the_eager_tokens(built, family) -> None:
    """The real thing: graphs recorded (the first when the stage loads) and replayed on a GPU (float32),
    against generate on the same GPU and the engine's eager steps; a second job replays a spare; two jobs
    stepped together (as one replay each) and alone in turn keep their tokens."""
    import transformers

    b = built(family)
    model = transformers.AutoModelForCausalLM.from_pretrained(b.src).to("cuda").eval()
    ids = torch.tensor([b.prompt()], device="cuda")
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(ids))
    want = out[0, PROMPT_LEN:].tolist()
    pipe = LocalPipeline(b.shards, 2, device="cuda", dtype="float32")
    assert all(len(s._spare_graphs) == 1 for s in pipe.stages if s._graphs_on)  # recorded at load
    eager = LocalPipeline(b.shards, 2, device="cuda", dtype="float32", graphs="off")
    assert eager.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == want
    assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == want
    graphed = [stage for stage in pipe.stages if stage._graphs_on]
    assert graphed and all(s._spare_graphs and s._spare_graphs[-1].graph is not None for s in graphed)
    recorded = {id(g) for s in graphed for g in s._spare_graphs}
    assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == want
    assert {id(g) for s in graphed for g in s._spare_graphs} == recorded  # the spare served: no recording

    nxt = {k: torch.tensor(p) for k, p in {"a": b.prompt(), "b": b.prompt()[:17]}.items()}
    got: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(12):
        keys = ["a", "b"] if 4 <= step < 8 else ["a"] if step % 2 else ["b"]
        decode_together(pipe.stages, keys, nxt, got)
    for k, prompt in {"a": b.prompt(), "b": b.prompt()[:17]}.items():
        assert got[k] == eager.generate(prompt, max_tokens=len(got[k])).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a GPU (bench/gpu.sh)")
def test_recorded_batch_graphs_on_a_gpu_give_the_eager_tokens(built) -> None:
    """20 jobs decoding together on a GPU (more than ``replay_rows``): one recorded batch decode graph a
    stage, replayed, through a room move; each job's tokens those of the eager batches on the same GPU."""
    b = built("llama")
    prompts = {f"j{i}": b.prompt()[: 5 + i] for i in range(20)}
    results = {}
    for graphs_setting in ("off", "auto"):
        pipe = LocalPipeline(b.shards, 2, device="cuda", dtype="float32", graphs=graphs_setting)
        nxt = {k: torch.tensor([int(pipe.step(k, torch.tensor(p)).argmax())]) for k, p in prompts.items()}
        got = {k: [int(x)] for k, x in nxt.items()}
        for _ in range(graphs.MIN_ROOM - 20):  # the longest job outgrows its first room
            decode_together(pipe.stages, list(prompts), nxt, got)
        results[graphs_setting] = got
        if graphs_setting == "auto":
            for stage in pipe.stages:
                rows = stage._jobs["j0"].rows
                assert rows is not None and rows.graph is not None and rows.graph.graph is not None
                assert rows.graph.room == 2 * graphs.MIN_ROOM
    assert results["auto"] == results["off"]
