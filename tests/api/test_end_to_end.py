"""A prompt over HTTP through real processes: gunicorn API, Celery scheduler, 2 then 3 worker processes that
each hold part of the demo model (their memory budgets force the split), all on a real Redis.

The tokens must equal transformers' greedy ``generate`` on the same weights. The workers start empty, so
the first job also exercises load orders: the model no worker holds is loaded, then served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import REPO, wait_for
from tests.support.api import MODEL_ID, Network

pytestmark = [pytest.mark.network, pytest.mark.slow]

NUM_LAYERS = 8  # the demo model
PROMPTS = ["The quick brown fox", "héllo wörld, ✓", "1 2 3 4 5 6 7 8 9 10 11 12", "azu", "Once upon a time",
           "Paris is the capital of", "zzzz", "What is 2+2?"]


def _finished(net: Network, job_id: str, timeout: float = 240) -> dict:
    def done() -> dict | None:
        body = net.get(f"/results/{job_id}").json()
        return body if body["status"] in ("done", "failed") else None

    try:
        return wait_for(done, timeout=timeout, what=f"job {job_id}", interval=0.05)
    except BaseException:
        print(net.log_tail())
        raise


def test_submit_matches_transformers(network, tokenizer, reference):
    prompt = PROMPTS[0]
    resp = network.post("/submit", {"model_id": MODEL_ID, "prompt": prompt, "max_tokens": 12})
    assert resp.status_code == 202, resp.text
    submitted = resp.json()
    result = _finished(network, submitted["job_id"])
    assert result["status"] == "done", result
    prompt_ids = tokenizer.encode(prompt)
    assert submitted["prompt_tokens"] == len(prompt_ids)
    expected = reference(prompt_ids, 12)
    assert result["token_ids"] == expected
    assert result["text"] == tokenizer.decode(expected)
    assert result["finish_reason"] == ("stop" if expected[-1] in tokenizer.eos_token_ids else "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(expected)
    # Every worker ran part of every step; together, each processed token went through every layer once.
    assert set(usage["workers"]) == set(network.worker_ids)
    assert all(v > 0 for v in usage["workers"].values())
    assert usage["token_layers"] == sum(usage["workers"].values())
    assert usage["token_layers"] == (len(prompt_ids) + len(expected) - 1) * NUM_LAYERS


def test_eight_concurrent_jobs_are_all_correct(network, tokenizer, reference):
    def run(prompt: str) -> tuple[str, dict]:
        resp = network.post("/submit", {"model_id": MODEL_ID, "prompt": prompt, "max_tokens": 10})
        assert resp.status_code == 202, resp.text
        return prompt, _finished(network, resp.json()["job_id"])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(run, PROMPTS))
    for prompt, result in results:
        assert result["status"] == "done", result
        assert result["token_ids"] == reference(tokenizer.encode(prompt), 10), prompt


def test_stop_string_cuts_the_text(network, tokenizer, reference):
    prompt = PROMPTS[4]
    expected = reference(tokenizer.encode(prompt), 16)
    full = tokenizer.decode(expected)
    # A stop string from the middle of what greedy decoding will produce.
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip() or len(full) < 6:
        pytest.skip(f"the demo model's answer {full!r} has no usable stop string")
    resp = network.post("/submit", {"model_id": MODEL_ID, "prompt": prompt, "max_tokens": 16, "stop": [stop]})
    result = _finished(network, resp.json()["job_id"])
    assert result["status"] == "done", result
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    assert result["token_ids"] == expected[: len(result["token_ids"])]


def _client(network):
    import openai

    return openai.OpenAI(base_url=network.base_url + "/v1", api_key="test-key", max_retries=0, timeout=120)


def test_openai_client_plain_and_streamed(network, tokenizer, reference):
    client = _client(network)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, who are you?"}]
    prompt_ids = tokenizer.encode_chat(messages)
    expected_ids = reference(prompt_ids, 12)
    expected_text = tokenizer.decode(expected_ids)

    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    assert plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected_text
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.completion_tokens == len(expected_ids)
    assert plain.usage.total_tokens == len(prompt_ids) + len(expected_ids)

    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed

    # Without include_usage there is no usage chunk.
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4,
                                                 temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]


def test_openai_errors_reach_the_client_as_exceptions(network):
    import openai

    client = _client(network)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nobody/nothing", messages=[{"role": "user", "content": "x"}])
    assert "not known" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5000)
    assert "context" in err.value.message


def test_api_process_never_imports_torch(network, tmp_path):
    """The API handles token ids and bytes only: after a served job, no gunicorn process has torch loaded
    (its shared library would be mapped), and an in-process app that served a request has no torch module.

    That app runs without the registry's folder (as azu-api on another machine would): it fetches the
    tokenizer files from the registry over HTTP, each checked against the manifest's SHA-256.
    """
    api = next(c for c in network.group.children if c.name == "api")
    import psutil

    procs = [psutil.Process(api.proc.pid), *psutil.Process(api.proc.pid).children(recursive=True)]
    assert len(procs) >= 2  # the gunicorn arbiter and its worker, which served the other tests' requests
    for p in procs:
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "libtorch" not in maps, p.pid

    code = (
        "import json, sys\n"
        "from web import create_app\n"
        "app = create_app()\n"
        "c = app.test_client()\n"
        f"r = c.post('/submit', json={{'model_id': {MODEL_ID!r}, 'prompt': 'hi', 'max_tokens': 2}})\n"
        "assert r.status_code == 202, r.get_json()\n"
        "r = c.get('/results/' + r.get_json()['job_id'])\n"
        "assert r.status_code == 200, r.get_json()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    # The registry (here: the network's API, which has the folder) knows the model is ready.
    assert network.get(f"/models/status?model_id={MODEL_ID}").json()["state"] == "ready"
    empty_registry, cache = tmp_path / "no-registry-here", tmp_path / "cache"
    env = dict(network.env, AZU_REGISTRY_DIR=str(empty_registry), AZU_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO),
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    fetched = cache / "tokenizers" / MODEL_ID
    source = Path(network.env["AZU_REGISTRY_DIR"]) / MODEL_ID
    assert (fetched / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert not empty_registry.exists()


def test_client_that_goes_away_cancels_its_stream(network):
    """Closing a stream mid-answer cancels the job: the workers stop long before max_tokens."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "talk for a long time"}],
            "max_tokens": 1500, "temperature": 0, "stream": True}
    with network.post("/v1/chat/completions", body, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        job_id = resp.headers["X-Azu-Job-Id"]
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith(b"data: ")
    # The connection is closed; the server notices at its next write and cancels the job.
    result = _finished(network, job_id, timeout=60)
    assert result["finish_reason"] == "cancelled", result
    assert len(result["token_ids"]) < 1500


def test_more_answers_than_sixteen_stream_at_once(network):
    """Every answer in flight holds one of the API's threads until it ends. With 16 (the default before), the
    17th request of a burst waited in the socket's queue until an earlier answer was over: 64 streams at once
    got their first tokens after a median 6 s instead of 2 (bench/api_streams.py). 24 streams sent at once
    are all accepted (their first chunk goes out once the job is held and submitted) before any of those that
    run to their length ends."""
    import requests

    def one(i: int) -> tuple[float, float, str | None]:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": f"Count to {i}"}],
                "max_tokens": 48, "temperature": 0, "stream": True}
        resp = requests.post(network.base_url + "/v1/chat/completions", json=body, stream=True, timeout=240,
                             headers={"Authorization": "Bearer test-key"})
        assert resp.status_code == 200, resp.text
        accepted, finish = None, None
        for line in resp.iter_lines(chunk_size=None):  # each chunk as it comes
            if line.startswith(b"data: {"):
                accepted = accepted or time.monotonic()
                for choice in json.loads(line[6:]).get("choices") or []:
                    finish = choice.get("finish_reason") or finish
        assert accepted is not None
        return accepted, time.monotonic(), finish

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24)))
    full = [end for _, end, finish in answers if finish == "length"]
    # (An answer the model ends early frees its thread: at least 20 must run to their length.)
    assert len(full) >= 20, [finish for *_, finish in answers]
    assert max(accepted for accepted, _, _ in answers) < min(full), network.log_tail()
