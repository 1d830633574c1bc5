"""The user's view of verified work: ``GET /results/<job_id>`` shows the job's verification, and a chat
completion carries it (with the URL to poll) in the ``azu`` extension field, on the plain answer and on the
final chunk of a stream only.

No worker runs here: the job is accepted against a directory entry with no process behind it, and what a
network would write (the job's events, then the verifier's status) is written into the job's Redis keys by
the test, through azu.verification.status as the verifier does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from azu import serving
from azu.network import keys
from azu.verification import status as verification
from tests.support.api import MODEL_ID

JOB_ID = "job-" + "5" * 32
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
AUTH = {"Authorization": "Bearer any-key"}  # FreeBilling: every key is user "local"


@pytest.fixture
def idle_worker(r) -> None:
    """A directory entry with room for the model and no process behind it: jobs are accepted and wait."""
    from azu.network import directory

    directory.register(r, directory.WorkerInfo(worker_id="idle-worker", queue="gpu.idle-worker", device="cpu",
                                               total_memory=1 << 34, free_memory=1 << 34))


@pytest.fixture
def finished_job(r, tokenizer, idle_worker, monkeypatch) -> list[int]:
    """The next job gets JOB_ID, and its answer is already in its event stream: a few tokens, then done."""
    monkeypatch.setattr(serving, "new_job_id", lambda: JOB_ID)
    token_ids = tokenizer.encode("hello world")[:3]
    usage = {"prompt_tokens": 1, "completion_tokens": len(token_ids), "token_layers": 8,
             "workers": {"idle-worker": 8}}
    for step, token in enumerate(token_ids, start=1):
        r.xadd(keys.events(JOB_ID), {"t": str(token)}, id=f"0-{step}")
    r.xadd(keys.events(JOB_ID), {"k": "done", "reason": "length", "usage": json.dumps(usage)},
           id=f"0-{len(token_ids) + 1}")
    return token_ids


def _sse_chunks(body: bytes) -> list[dict[str, Any]]:
    lines = [ln.removeprefix("data: ") for ln in body.decode().splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_results_show_no_verification_until_the_verifier_writes_one(client, r, idle_worker) -> None:
    resp = client.post("/submit", json={"model_id": MODEL_ID, "prompt": "hello", "max_tokens": 4},
                       headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["job_id"]
    shown = client.get(f"/results/{job_id}", headers=AUTH).get_json()
    assert "verification" in shown and shown["verification"] is None

    verification.write(r, job_id, "pending")
    assert client.get(f"/results/{job_id}", headers=AUTH).get_json()["verification"] == {"status": "pending"}

    verification.write(r, job_id, "failed", hop=1, worker="w-cheat", reason="hidden states differ at chunk 2")
    assert client.get(f"/results/{job_id}", headers=AUTH).get_json()["verification"] == {
        "status": "failed", "hop": 1, "worker": "w-cheat", "reason": "hidden states differ at chunk 2"}


def test_chat_answer_carries_the_job_and_its_verification(client, r, tokenizer, finished_job) -> None:
    verification.write(r, JOB_ID, "pending")
    resp = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode(finished_job)
    assert answer["azu"] == {"job_id": JOB_ID,
                             "verification": {"status": "pending", "url": f"/results/{JOB_ID}"}}
    assert resp.headers["X-Azu-Job-Id"] == JOB_ID

    # The official client keeps the extension: ``completion.azu`` (pydantic's extra fields).
    from openai.types.chat import ChatCompletion

    assert ChatCompletion.model_validate(answer).azu == answer["azu"]  # type: ignore[attr-defined]

    verification.write(r, JOB_ID, "verified")  # the check ran after the answer: the URL shows the outcome
    polled = client.get(answer["azu"]["verification"]["url"], headers=AUTH)
    assert polled.status_code == 200 and polled.get_json()["verification"] == {"status": "verified"}


def test_chat_answer_before_any_decision_says_null(client, finished_job) -> None:
    answer = client.post("/v1/chat/completions", json=CHAT, headers=AUTH).get_json()
    assert answer["azu"]["verification"] == {"status": None, "url": f"/results/{JOB_ID}"}


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "with-usage"])
def test_stream_carries_the_extension_on_its_final_chunk_only(client, r, finished_job, include_usage) -> None:
    verification.write(r, JOB_ID, "not_checked")
    body = {**CHAT, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    resp = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 200
    chunks = _sse_chunks(resp.data)
    assert all("azu" not in c for c in chunks[:-1])
    final = chunks[-1]
    assert final["azu"] == {"job_id": JOB_ID,
                            "verification": {"status": "not_checked", "url": f"/results/{JOB_ID}"}}
    from openai.types.chat import ChatCompletionChunk

    assert ChatCompletionChunk.model_validate(final).azu == final["azu"]  # type: ignore[attr-defined]
    if include_usage:
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == len(finished_job)
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    else:
        assert final["choices"][0]["finish_reason"] == "length" and "usage" not in final


def test_the_document_describes_the_fields(client) -> None:
    doc = client.get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    assert "verification" in schemas["JobResult"]["required"]
    assert "azu" in schemas["ChatCompletion"]["required"]
    assert set(schemas["VerificationLink"]["properties"]) == {"status", "url"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["description"]
    assert "azu" in chat and "final chunk" in chat
