"""A worker under load: decode steps in micro-batches, prompts in chunks between them (azu.network.batching).

Every job must still get transformers' greedy tokens: the nodes here run in this process (InlineNetwork), so
the batches they form can be watched, with a prompt chunk of 3 positions so that every prompt is split.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from azu.engine.span import Span
from azu.network import batching, jobs
from azu.network.wire import Hop, JobGrant, Sampling, StepPayload
from azu.registry import status as models
from tests.support.network import InlineNetwork

pytestmark = [pytest.mark.network]

PROMPTS = [[1, 40, 50, 60, 70, 80], [1, 99, 12], [1, *range(100, 140)], [1, 7], [1, 300, 250, 200, 150],
           [1, 65, 66, 67, 68], [1, 33, 44, 55], [1, 111, 222, 3, 4, 5, 6]]


def _watched_pair(r, model_id: str, prefix: str, chunk: int,
                  monkeypatch) -> tuple[InlineNetwork, list[list[int]]]:
    """Two nodes holding ``model_id`` (layers 0-2 with the embeddings, 2-4 with the head) and the row sizes of
    every batch the first one runs (a list that fills as the network runs)."""
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    first = net.add(f"{prefix}1", folder, model_id, 0, 2, 4, prefill_chunk=chunk)
    net.add(f"{prefix}2", folder, model_id, 2, 4, 4, prefill_chunk=chunk)
    stage = first.stages[(model_id, Span(0, 2, True, False))]
    seen: list[list[int]] = []
    run_batch = stage._run_batch

    def watch(jobs_: list[Any], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append([int(x.shape[0]) for x in inputs])
        return run_batch(jobs_, inputs)

    monkeypatch.setattr(stage, "_run_batch", watch)
    return net, seen


def test_chunked_prompts_and_micro_batches_match_generate(r, shard, reference, monkeypatch) -> None:
    model_id = shard("tiny-chunked")
    net, seen = _watched_pair(r, model_id, "c", 3, monkeypatch)
    n = 10
    ids = []
    for p in PROMPTS:
        job_id = f"jc-{len(ids)}"
        jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=p,
                                           max_tokens=n), dispatch=net)
        ids.append(job_id)
    net.run()
    for job_id, prompt in zip(ids, PROMPTS, strict=True):
        view = jobs.get_job(r, job_id)
        assert view is not None and view.status == "done", view
        assert view.token_ids == reference(prompt, n), f"job for prompt {prompt}"
    # The first batch: all prompts, nobody decoding yet (ALONE_CHUNKS chunks at once); from then on, beside
    # decoding jobs, no prompt runs more than a chunk at a time.
    assert seen and sum(seen[0]) == 3 * batching.ALONE_CHUNKS
    assert all(max(rows) <= 3 for rows in seen[1:])
    assert any(len(rows) > 1 and max(rows) > 1 for rows in seen)  # chunks of several prompts batched
    assert any(len(rows) > 1 and max(rows) == 1 for rows in seen)  # decode steps batched


def _take(r, worker_id: str) -> list[bytes]:
    """What waits in a worker's inbox, taken (the tests run its rounds by hand)."""
    from azu.network import keys

    blobs = r.lrange(keys.pending(worker_id), 0, -1)
    r.delete(keys.pending(worker_id))
    return blobs


def _step(job: str, size: int, *, step: int = 0, max_tokens: int = 16) -> tuple[StepPayload, torch.Tensor]:
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=(),
                        stop_ids=(), prompt_len=size)
    route = (Hop("a", Span(0, 2, True, False)), Hop("b", Span(2, 4, False, True)))
    grant = JobGrant(job_id=job, model_id="m", manifest_sha256="", route=route, public_keys=("aa" * 32,) * 2,
                     sampling=sampling, epoch=0, expires_at=1e10)
    payload = StepPayload(job_id=job, step=step, hop=0, pos=0, x=[1] * size, grant=b"g", grant_sig=b"s",
                          grant_info=grant)
    return payload, torch.ones(size, dtype=torch.long)


def test_queue_splits_decode_steps_and_shares_the_chunk() -> None:
    stage_id = ("m", Span(0, 2, True, False))
    q = batching.StepQueue(chunk=8)
    for i in range(6):
        q.add(stage_id, *_step(f"d{i}", 1))
    q.add(stage_id, *_step("long", 20))
    q.add(stage_id, *_step("short", 5))
    assert [r.item.step.job_id for r in q.decode_batch(stage_id, 3)] == ["d0", "d1", "d2"]
    rows = q.prompt_batch(stage_id)
    assert [(r.item.step.job_id, r.n) for r in rows] == [("long", 8)]  # the oldest prompt takes the chunk
    rows[0].item.done += 8
    rows = q.prompt_batch(stage_id)
    assert [(r.item.step.job_id, r.n, r.last) for r in rows] == [("long", 8, False)]
    rows[0].item.done += 8
    rows = q.prompt_batch(stage_id)
    assert [(r.item.step.job_id, r.n, r.last) for r in rows] == [("long", 4, True), ("short", 4, False)]
    alone = batching.StepQueue(chunk=8)
    alone.add(stage_id, *_step("long", 40))
    assert [r.n for r in alone.prompt_batch(stage_id, alone=True)] == [8 * batching.ALONE_CHUNKS]
    assert alone.prompt_jobs(stage_id) == 1 and q.prompt_jobs(stage_id) == 2
    assert batching.micro_batch_rows(16, 2) == 8 and batching.micro_batch_rows(3, 2) == 2
    assert batching.micro_batch_rows(5, 1) == 5 and batching.micro_batch_rows(0, 2) == 1


def test_the_jobs_last_steps_ride_in_one_batch() -> None:
    """The last steps of jobs (their ``max_tokens``-th token) go first and all in the batch: split off, they
    would cost passes over the weights with no later step of theirs for the other stages to run meanwhile
    (bench/pipeline.py, P3: the last 7 steps of 16 streams ran as batches of 4, 2 and 1)."""
    stage_id = ("m", Span(2, 4, False, True))
    q = batching.StepQueue(chunk=8)
    q.add(stage_id, *_step("on", 1, step=5))
    for i in range(7):
        q.add(stage_id, *_step(f"last{i}", 1, step=15))
    queued = [r.item.step for r in q.decode_batch(stage_id, 1 << 30)]
    ending = sum(1 for step in queued if batching.last_step(step))
    assert ending == 7
    rows = batching.micro_batch_rows(8, 2, ending=ending)
    assert rows == 8  # all 7 last steps, and half of the one job that goes on
    assert [r.item.step.job_id for r in q.decode_batch(stage_id, 7)] == [f"last{i}" for i in range(7)]
    # Only last steps: one batch, however many (the rule without them would split 7 into 4, 2 and 1).
    assert batching.micro_batch_rows(7, 2, ending=7) == 7
    assert batching.micro_batch_rows(7, 2) == 4
    # Jobs that go on are split as before.
    assert batching.micro_batch_rows(16, 2, ending=0) == 8 and batching.micro_batch_rows(16, 2, ending=2) == 9


def test_an_end_order_taken_mid_session_drops_the_jobs_queued_rows(r, shard) -> None:
    """The core's end order comes in the inbox, so it can arrive while the session still holds rows of the
    job (here the rest of a prompt's chunks): they are dropped with its caches, not run on a fresh cache."""
    from azu.network.inbox import Inbox

    model_id = shard("tiny-ended")  # a model of its own: no other test's nodes hold it
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    first = net.add("e1", folder, model_id, 0, 2, 4, prefill_chunk=3)
    net.add("e2", folder, model_id, 2, 4, 4, prefill_chunk=3)
    stage = first.stages[(model_id, Span(0, 2, True, False))]

    job_id = "je-mid-session"
    jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id,
                                       prompt_ids=[1, *range(100, 120)], max_tokens=4), dispatch=net)
    queue = batching.StepQueue(chunk=3)
    first._process(_take(r, "e1"), queue)  # one round: the first 12 of 21 positions (alone: 4 chunks of 3)
    assert queue and stage.job_length(job_id) == 3 * batching.ALONE_CHUNKS
    assert jobs.fail_job(r, job_id, "test: ended mid-prompt", dispatch=net)
    (order,) = _take(r, "e1")
    assert first._process([order], queue) == 0
    assert not queue and job_id not in stage.jobs and job_id not in first.jobs
    assert first._process([order], queue) == 0  # the same order again: nothing left to end, nothing breaks
    for worker_id in ("e1", "e2"):
        Inbox(r, worker_id).clear()


def test_a_prompt_runs_in_longer_chunks_only_while_no_other_job_is_in_flight(r, shard) -> None:
    """A chunk is a pass over the stage's weights: a prompt with nobody to hold up runs ALONE_CHUNKS chunks
    at once; beside a job decoding at the worker it runs one chunk a turn."""
    from azu.network.inbox import Inbox

    model_id = shard("tiny-alone")
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    first = net.add("c1", folder, model_id, 0, 2, 4, prefill_chunk=3)
    second = net.add("c2", folder, model_id, 2, 4, 4, prefill_chunk=3)
    stage = first.stages[(model_id, Span(0, 2, True, False))]

    def submit(job_id: str, prompt: list[int]) -> None:
        jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=prompt,
                                           max_tokens=8), dispatch=net)

    submit("ja-decoding", [1, 40, 50])
    first._process(_take(r, "c1"))  # its prompt, whole
    second._process(_take(r, "c2"))  # its first token; its next step waits at c1: it is in flight there
    submit("ja-long", [1, *range(100, 120)])
    queue = batching.StepQueue(chunk=3)
    first._process(_take(r, "c1"), queue)  # one round: the decoding job's step, then one chunk of the prompt
    assert stage.job_length("ja-long") == 3 and stage.job_length("ja-decoding") == 4
    assert jobs.fail_job(r, "ja-decoding", "test: done", dispatch=net)
    first._process(_take(r, "c1"), queue)  # the end order; then the prompt is alone: 4 chunks at once
    assert stage.job_length("ja-long") == 3 + 3 * batching.ALONE_CHUNKS
    assert jobs.fail_job(r, "ja-long", "test: done", dispatch=net)  # no running job left for other tests
    for worker_id in ("c1", "c2"):
        Inbox(r, worker_id).clear()


def test_decode_rows_ride_with_a_short_prompt_chunk() -> None:
    stage_id = ("m", Span(0, 2, True, False))
    q = batching.StepQueue(chunk=128)
    q.add(stage_id, *_step("decoding", 1))
    for i in range(7):
        q.add(stage_id, *_step(f"new{i}", 16))
    decode, prompt = q.decode_batch(stage_id, 8), q.prompt_batch(stage_id)
    assert batching.mixes_cheaply(decode, prompt)  # 1 + 112 positions, 15 of padding: one batch
    long = batching.StepQueue(chunk=128)
    for i in range(8):
        long.add(stage_id, *_step(f"d{i}", 1))
    long.add(stage_id, *_step("long", 2048))
    decode, prompt = long.decode_batch(stage_id, 8), long.prompt_batch(stage_id)
    assert [r.n for r in prompt] == [128]
    assert not batching.mixes_cheaply(decode, prompt)  # 8 rows padded to 128 positions each: apart
    assert not batching.mixes_cheaply([], prompt) and not batching.mixes_cheaply(decode, [])


def test_a_job_decoding_alone_joins_the_prompts_that_came_after_it(r, shard, reference, monkeypatch) -> None:
    """The first user's prompt runs alone (the others arrive while it runs); its next step then runs in one
    batch with the others' prompts, and from there on it decodes in the others' micro-batches; tokens stay
    generate's."""
    model_id = shard("tiny-mixed")
    net, seen = _watched_pair(r, model_id, "m", 64, monkeypatch)
    prompts = [[1, 40, 50, 60], [1, 99, 12, 7], [1, 300, 250, 200], [1, 65, 66, 67]]
    n = 6

    def submit(i: int) -> str:
        job_id = f"jm-{i}"
        jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id,
                                           prompt_ids=prompts[i], max_tokens=n), dispatch=net)
        return job_id

    ids = [submit(0)]
    net.step()  # m1 runs the first prompt alone
    net.step()  # m2 samples its first token and sends its next step to m1
    ids += [submit(i) for i in range(1, len(prompts))]
    net.run()
    for job_id, prompt in zip(ids, prompts, strict=True):
        view = jobs.get_job(r, job_id)
        assert view is not None and view.status == "done", view
        assert view.token_ids == reference(prompt, n), f"job for prompt {prompt}"
    mixed = seen.index([1, 4, 4, 4])  # the decode step rode with the three prompts
    # From there on the four jobs decode in micro-batches of two (4 jobs over 2 stages), and each job's last
    # step rides in the batch at hand: the first job's (it ends a step early) with a micro-batch, then the
    # other three's together, not split into two and one (batching.micro_batch_rows).
    assert seen[mixed + 1 :] == [[1, 1]] * 6 + [[1, 1, 1]] * 2


def test_a_request_reads_its_models_record_once(r, shard, reference, monkeypatch) -> None:
    """The API reads a model's record for the hold (``status_and_info``) and hands what it read to
    ``submit_job``: one round trip for it on the way to the first token, not three; the job still gives
    ``generate``'s tokens."""
    model_id = shard("tiny-read-once")
    net, _ = _watched_pair(r, model_id, "o", 64, monkeypatch)
    reads: list[str] = []
    read = models._model_record

    def counted(r_: Any, model: str) -> dict[str, str]:
        reads.append(model)
        return read(r_, model)

    monkeypatch.setattr(models, "_model_record", counted)
    status, info = models.status_and_info(r, model_id)
    assert status["state"] == "ready" and info is not None
    prompt = [1, 40, 50, 60]
    jobs.submit_job(r, jobs.JobRequest(job_id="jo-1", user_id="u", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=5), dispatch=net, info=info)
    assert reads == [model_id]
    net.run()
    view = jobs.get_job(r, "jo-1")
    assert view is not None and view.status == "done" and view.token_ids == reference(prompt, 5)


def test_a_prompt_arriving_in_parts_runs_as_its_parts_arrive() -> None:
    """A later stage gets a long prompt a chunk at a time, as the stage before runs it: it runs what has
    arrived, waits for the rest (nothing runnable, not a decode step), and samples only at the end."""
    stage_id = ("m", Span(2, 4, False, True))
    q = batching.StepQueue(chunk=4)
    part, x = _step("long", 20)
    q.add(stage_id, part, x[:6], total=20)
    q.add(stage_id, *_step("dec", 1, step=3))
    assert [r.item.step.job_id for r in q.decode_batch(stage_id, 8)] == ["dec"]
    rows = q.prompt_batch(stage_id, alone=True)
    assert [(r.item.step.job_id, r.n, r.last) for r in rows] == [("long", 6, False)]  # all that arrived
    rows[0].item.done += 6
    q.remove(stage_id, "dec")
    assert q and not q.runnable() and q.prompt_batch(stage_id, alone=True) == []
    assert q.decode_batch(stage_id, 8) == [] and q.prompt_jobs(stage_id) == 1
    item = q.item(stage_id, "long")
    assert item is not None and not item.complete
    item.extend(x[6:19])
    assert q.runnable() and [(r.n, r.last) for r in q.prompt_batch(stage_id)] == [(4, False)]
    item.done = 19
    item.extend(x[19:])  # one position left: still a prompt's row, not a decode step
    assert item.complete and q.decode_batch(stage_id, 8) == []
    assert [(r.n, r.last) for r in q.prompt_batch(stage_id)] == [(1, True)]
    # Many one-row parts: joined only as far as a chunk needs, and let go once they have run.
    many = batching.Queued(part, torch.arange(1.0, 2.0), total=100)
    for i in range(2, 101):
        many.extend(torch.tensor([float(i)]))
    assert torch.equal(many.rows(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    many.done = 4
    assert torch.equal(many.rows(10), torch.arange(5.0, 15.0))
    many.done = 90
    assert torch.equal(many.rows(10), torch.arange(91.0, 101.0)) and len(many._parts) == 1
    # Parts that never line up with the chunks (a first part of one row, then 128 at a time): the rows held
    # stay the ones not run and at most a chunk and a part more (joining the run ones again would copy the
    # prompt over and over, and hold all of it).
    odd = batching.Queued(part, torch.zeros(1), total=1 + 128 * 8)
    for i in range(8):
        odd.extend(torch.arange(1.0 + 128 * i, 1.0 + 128 * (i + 1)))
    while odd.left:
        n = min(128, odd.left)
        assert torch.equal(odd.rows(n)[-1:], torch.tensor([float(odd.done + n - 1)]))
        odd.done += n
        assert sum(int(p.shape[0]) for p in odd._parts) <= odd.left + 2 * 128


def test_a_long_prompts_chunks_go_on_as_they_run(r, shard, reference) -> None:
    """Each chunk a stage runs of a prompt goes on at once (the next stage runs it while this one runs the
    next chunk), across three workers whose chunks do not line up; the answer is transformers' greedy one,
    and the last worker kept the signed parts as evidence of what it was given."""
    from azu.network.inbox import Inbox
    from azu.network.wire import unpack_inbox

    model_id = shard("tiny-parts")
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    first = net.add("p1", folder, model_id, 0, 1, 4, prefill_chunk=3)
    middle = net.add("p2", folder, model_id, 1, 3, 4, prefill_chunk=2)
    net.add("p3", folder, model_id, 3, 4, 4, prefill_chunk=5)
    prompt = [1, *range(100, 140)]
    jobs.submit_job(r, jobs.JobRequest(job_id="jp-long", user_id="u", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=6), dispatch=net)
    held = batching.StepQueue(chunk=3)  # the first worker's session, one round at a time
    first._process(_take(r, "p1"), held)  # one round: 4 chunks of 3, alone
    blobs = _take(r, "p2")
    handed = [StepPayload.unpack(b) for blob in blobs for b in unpack_inbox(blob).steps]
    assert [(p.hop, p.pos, _rows(p)) for p in handed] == [(1, 0, 12)]
    stage = first.stages[(model_id, Span(0, 1, True, False))]
    assert stage.job_length("jp-long") == 12  # the first stage has run 12 of the prompt's 41 positions...
    middle._process(blobs)
    middle_stage = middle.stages[(model_id, Span(1, 3, False, False))]
    assert middle_stage.job_length("jp-long") == 12  # ...and the next one has already run them (in 8 + 4)
    while held.runnable():
        first._process([], held)
    net.run()
    view = jobs.get_job(r, "jp-long")
    assert view is not None and view.status == "done" and view.token_ids == reference(prompt, 6)
    kept = net.nodes["p3"].evidence.take("jp-long", 0)
    parts = sorted(StepPayload.unpack(b).pos for blob in kept for b in unpack_inbox(blob).steps
                   if StepPayload.unpack(b).step == 0)
    assert len(parts) > 2 and parts[0] == 0  # the prompt reached the last worker in parts
    for worker_id in ("p1", "p2", "p3"):
        Inbox(r, worker_id).clear()


def _rows(p: StepPayload) -> int:
    from azu.network.wire import unpack_tensor

    assert isinstance(p.x, bytes)
    return int(unpack_tensor(p.x).shape[0])


def test_a_duplicate_part_is_answered_with_the_parts_it_overlaps_only(r, shard) -> None:
    """A stage that gets a part of a prompt again (a redelivery, or a hop before that sends it twice) answers
    again with what it sent for those positions, not with every part: answered with all, each later hop
    would multiply them (parts at hop 1 x parts at hop 2 x ...)."""
    from azu.network.inbox import Inbox
    from azu.network.wire import unpack_inbox

    model_id = shard("tiny-parts-again")
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    net.add("q1", folder, model_id, 0, 1, 4, prefill_chunk=3)
    middle = net.add("q2", folder, model_id, 1, 3, 4, prefill_chunk=2)
    net.add("q3", folder, model_id, 3, 4, 4, prefill_chunk=5)
    prompt = [1, *range(100, 140)]
    jobs.submit_job(r, jobs.JobRequest(job_id="jq-again", user_id="u", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=8), dispatch=net)
    net.step_until("jq-again", 1)  # the prompt has gone through
    sent = [p.pos for p in middle.jobs["jq-again"].last_out[1][1]]  # type: ignore[union-attr]
    assert sent == [0, 8, 16, 24, 32, 40]  # the middle stage ran the prompt 8 positions at a time
    received = [blob for blob in middle.evidence.take("jq-again", 0)
                if StepPayload.unpack(unpack_inbox(blob).steps[0]).step == 0]
    first = StepPayload.unpack(unpack_inbox(received[0]).steps[0])
    assert (first.pos, _rows(first)) == (0, 12)  # the first stage's first part: positions 0-11
    middle._process([received[0]])  # the same part again
    # What it sent q3: in q3's list, or riding in the message that wakes q3.
    woke = [m for m in net.queue if m[1] == "gpu.q3"]
    blobs = _take(r, "q3") + [blob for m in woke for blob in (m[2][0] if m[2] else [])]
    again = [p for blob in blobs for b in unpack_inbox(blob).steps if (p := StepPayload.unpack(b)).step == 0]
    assert [p.pos for p in again] == [0, 8]  # the parts covering positions 0-11, not all six
    # A signed duplicate whose hidden state is no rows at all (a 0-d tensor): answered with nothing, and the
    # session goes on.
    from azu.network.wire import pack_tensor

    scalar = StepPayload("jq-again", 0, 1, 0, pack_tensor(torch.tensor(1.0)), first.grant, first.grant_sig)
    middle._process(jobs.bundles([scalar], sender="q1", key=net.nodes["q1"].key).values())
    assert not [b for b in _take(r, "q3") if StepPayload.unpack(unpack_inbox(b).steps[0]).step == 0]
    net.run()
    assert jobs.get_job(r, "jq-again").status == "done"
    for worker_id in ("q1", "q2", "q3"):
        Inbox(r, worker_id).clear()


def test_a_prompt_waiting_for_its_next_part_keeps_its_cache(r, shard) -> None:
    """A later stage holding part of a prompt, waiting for the rest: the idle sweep leaves the job alone
    while the session holds it; and if its cache is freed all the same (an end order), the next part is not
    run on top of nothing (dropped: the job is replayed), however the queue looked."""
    from azu.network.inbox import Inbox

    model_id = shard("tiny-parts-held")
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    first = net.add("h1", folder, model_id, 0, 2, 4, prefill_chunk=3)
    second = net.add("h2", folder, model_id, 2, 4, 4, prefill_chunk=3)
    jobs.submit_job(r, jobs.JobRequest(job_id="jh-held", user_id="u", model_id=model_id,
                                       prompt_ids=[1, *range(100, 140)], max_tokens=3), dispatch=net)
    q1, q2 = batching.StepQueue(chunk=3), batching.StepQueue(chunk=3)
    first._process(_take(r, "h1"), q1)  # 12 positions run, handed on
    second._process(_take(r, "h2"), q2)  # ... and run here; the rest of the prompt is still to come
    stage = second.stages[(model_id, Span(2, 4, False, True))]
    assert stage.job_length("jh-held") == 12 and q2.has_job("jh-held") and not q2.runnable()
    second._held = q2  # as in a session
    far = time.time() + 10 * second.kv_idle_s
    assert second.sweep_idle(now=far) == [] and stage.job_length("jh-held") == 12
    second._held = None
    assert second.sweep_idle(now=far) == ["jh-held"] and stage.job_length("jh-held") == 0
    first._process([], q1)  # the next 12 positions go on
    second._process(_take(r, "h2"), q2)
    assert stage.job_length("jh-held") == 0 and not q2.has_job("jh-held")  # not run on an empty cache
    # A signed part at the positions held whose hidden state is no rows at all (a 0-d tensor): the job
    # fails with a reason, and the session goes on (it raised out of it before).
    from azu.network import keys
    from azu.network.wire import pack_tensor

    raw = r.hgetall(keys.job("jh-held"))
    scalar = StepPayload("jh-held", 0, 1, 0, pack_tensor(torch.tensor(1.0)), raw[b"grant"], raw[b"grant_sig"])
    second._process(jobs.bundles([scalar], sender="h1", key=first.key).values(), q2)
    net.collect()
    view = jobs.get_job(r, "jh-held")
    assert view is not None and view.status == "failed" and "does not fit" in str(view.error)
    assert stage.job_length("jh-held") == 0
    for worker_id in ("h1", "h2"):
        Inbox(r, worker_id).clear()
