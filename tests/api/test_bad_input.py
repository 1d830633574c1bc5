"""Bad input gets a 4xx (or 503 for no capacity) with a reason, never a 500; OpenAI's error shape everywhere.

Table-driven: each row is a request and what the answer must say. No worker runs here: these requests are
refused before anything is enqueued (the no-capacity row is refused because no worker exists).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from azu.billing.base import FreeBilling
from azu.errors import PaymentRequired, Unauthorized
from tests.support.api import MODEL_ID

OK_SUBMIT = {"model_id": MODEL_ID, "prompt": "hello", "max_tokens": 4}
OK_CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _with(base: dict, **changes) -> dict:
    out = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DROP = object()
CHAT = "/v1/chat/completions"

# (id, path, body (dict -> JSON, str/bytes -> raw), status, param or None, words the reason must contain)
CASES = [
    ("submit-not-json", "/submit", "{nope", 400, None, "not valid JSON"),
    ("submit-empty-body", "/submit", b"", 400, None, "empty"),
    ("submit-array", "/submit", [1, 2], 400, None, "JSON object"),
    ("submit-no-model", "/submit", _with(OK_SUBMIT, model_id=_DROP), 400, "model_id", "missing"),
    ("submit-no-prompt", "/submit", _with(OK_SUBMIT, prompt=_DROP), 400, "prompt", "missing"),
    ("submit-empty-prompt", "/submit", _with(OK_SUBMIT, prompt=""), 400, "prompt", "at least 1"),
    ("submit-no-budget", "/submit", _with(OK_SUBMIT, max_tokens=_DROP), 400, None, "max_tokens"),
    ("submit-budgets-disagree", "/submit", _with(OK_SUBMIT, est_tokens=9), 400, None, "disagree"),
    ("submit-zero-tokens", "/submit", _with(OK_SUBMIT, max_tokens=0), 400, "max_tokens", "greater than"),
    ("submit-string-tokens", "/submit", _with(OK_SUBMIT, max_tokens="5"), 400, "max_tokens", "integer"),
    ("submit-bool-tokens", "/submit", _with(OK_SUBMIT, max_tokens=True), 400, "max_tokens", "integer"),
    ("submit-hot", "/submit", _with(OK_SUBMIT, temperature=3), 400, "temperature", "less than"),
    ("submit-cold", "/submit", _with(OK_SUBMIT, temperature=-0.5), 400, "temperature", "greater than"),
    ("submit-top-p-zero", "/submit", _with(OK_SUBMIT, top_p=0), 400, "top_p", "greater than"),
    ("submit-top-k", "/submit", _with(OK_SUBMIT, top_k=-2), 400, "top_k", "greater than"),
    ("submit-seed", "/submit", _with(OK_SUBMIT, seed=-1), 400, "seed", "greater than"),
    ("submit-stop-number", "/submit", _with(OK_SUBMIT, stop=5), 400, "stop", "string or a list"),
    ("submit-stop-empty", "/submit", _with(OK_SUBMIT, stop=["a", ""]), 400, "stop.1", "at least 1"),
    ("submit-stop-many", "/submit", _with(OK_SUBMIT, stop=[str(i) for i in range(17)]), 400, "stop", "16"),
    ("submit-unknown-field", "/submit", _with(OK_SUBMIT, max_token=5), 400, "max_token", "unknown"),
    ("submit-unknown-model", "/submit", _with(OK_SUBMIT, model_id="nobody/nothing"), 404, "model_id",
     "not known"),
    ("submit-bad-model-id", "/submit", _with(OK_SUBMIT, model_id="../../etc"), 404, "model_id", "not known"),
    ("submit-sharding", "/submit", _with(OK_SUBMIT, model_id="being/sharded"), 409, "model_id", "not ready"),
    ("submit-failed-model", "/submit", _with(OK_SUBMIT, model_id="broken/model"), 409, "model_id",
     "failed to shard: no config.json"),
    ("submit-prompt-too-long", "/submit", _with(OK_SUBMIT, prompt="x" * 2100), 400, "prompt", "context"),
    ("submit-over-context", "/submit", _with(OK_SUBMIT, prompt="x" * 2000, max_tokens=100), 400, "max_tokens",
     "context of 2048"),
    ("submit-no-capacity", "/submit", OK_SUBMIT, 503, "model", "no live worker"),
    ("chat-not-json", CHAT, "nope", 400, None, "not valid JSON"),
    ("chat-no-messages", CHAT, _with(OK_CHAT, messages=_DROP), 400, "messages", "missing"),
    ("chat-empty-messages", CHAT, _with(OK_CHAT, messages=[]), 400, "messages", "at least 1"),
    ("chat-bad-role", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role", "user"),
    ("chat-only-system", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "system", "content": "x"}]), 400, "messages", "user or assistant"),
    ("chat-image", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages.0.content", "only text"),
    ("chat-content-number", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": 5}]), 400, "messages.0.content",
     "string or a list"),
    ("chat-n", CHAT, _with(OK_CHAT, n=2), 400, "n", "1"),
    ("chat-penalty", CHAT, _with(OK_CHAT, presence_penalty=0.5), 400, "presence_penalty", "0"),
    ("chat-tools", CHAT, _with(OK_CHAT, tools=[]), 400, "tools", "unknown or unsupported"),
    ("chat-stream-options", CHAT, _with(OK_CHAT, stream_options={"include_usage": True}),
     400, None, "only allowed when stream"),
    ("chat-stream-string", CHAT, _with(OK_CHAT, stream="yes"), 400, "stream", "boolean"),
    ("chat-temperature-string", CHAT, _with(OK_CHAT, temperature="hot"), 400, "temperature",
     "number"),
    ("chat-unknown-model", CHAT, _with(OK_CHAT, model="nobody/nothing"), 404, "model",
     "not known"),
    ("chat-over-context", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": "y" * 2000}], max_tokens=200), 400, "max_tokens",
     "context"),
    ("chat-no-capacity", CHAT, OK_CHAT, 503, "model", "no live worker"),
    ("chat-content-null", CHAT, _with(OK_CHAT, messages=[{"role": "user", "content": None}]), 400,
     "messages.0.content", "string or a list"),
    ("chat-content-missing", CHAT, _with(OK_CHAT, messages=[{"role": "user"}]), 400, "messages.0.content",
     "missing"),
    ("chat-temperature-nan", CHAT, '{"model": "azu-demo", "messages": [{"role": "user", "content": "hi"}], '
     '"temperature": NaN}', 400, None, "NaN"),
    ("submit-infinity", "/submit", '{"model_id": "azu-demo", "prompt": "hi", "max_tokens": Infinity}', 400,
     None, "Infinity"),
    ("shard-no-model", "/models/shard", {}, 400, "model_id", "missing"),
    ("shard-bad-id", "/models/shard", {"model_id": "a/../../b"}, 400, "model_id", "invalid model id"),
    ("shard-folder-not-allowed", "/models/shard", {"model_id": "/etc"}, 403, "model_id",
     "AZU_ALLOWED_MODEL_DIRS"),
    ("shard-unknown-field", "/models/shard", {"model_id": "a/b", "revision": "x"}, 400, "revision",
     "unknown"),
]


@pytest.fixture
def seeded(r, registry_dir):
    """Model states the table refers to: one still sharding, one that failed."""
    r.hset("azu:model:being/sharded", mapping={"state": "sharding", "progress": "0.4", "reason": ""})
    r.hset("azu:model:broken/model", mapping={"state": "failed", "progress": "0", "reason": "no config.json"})


@pytest.mark.parametrize(("path", "body", "status", "param", "words"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_reason(client, seeded, path, body, status, param, words):
    if isinstance(body, dict | list):
        resp = client.post(path, json=body)
    else:
        resp = client.post(path, data=body, content_type="application/json")
    assert resp.status_code == status, resp.get_data(as_text=True)
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    message, got_param = err["message"], err["param"]
    assert err["type"] in ("invalid_request_error", "not_found_error", "conflict_error",
                           "service_unavailable", "permission_error")
    if status == 503:
        assert int(resp.headers["Retry-After"]) >= 1
    assert words.lower() in message.lower(), message
    assert got_param == param


def _error(resp) -> dict:
    assert resp.mimetype == "application/json", resp.get_data(as_text=True)[:200]
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_route_and_method_answer_json(client):
    assert _error(client.get("/nope"))["type"] == "not_found_error"
    resp = client.get("/submit")
    assert resp.status_code == 405 and "GET is not allowed" in _error(resp)["message"]
    assert "POST" in resp.headers["Allow"]
    resp = client.get("/v1/nope")
    assert resp.status_code == 404 and _error(resp)["type"] == "not_found_error"


def test_body_must_be_json(client):
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        resp = client.post("/submit", data=json.dumps(OK_SUBMIT), content_type=content_type)
        assert resp.status_code == 415, content_type
        assert "Content-Type: application/json" in _error(resp)["message"]


def test_oversized_url_headers_and_body_answer_json(app, client):
    resp = client.get("/models/status?model_id=" + "a" * 9000)
    assert resp.status_code == 414 and "URL" in _error(resp)["message"]
    resp = client.get("/healthz", headers={"X-Padding": "p" * 20000})
    assert resp.status_code == 431 and "headers" in _error(resp)["message"]
    big = {"model_id": MODEL_ID, "prompt": "x" * (app.config["MAX_CONTENT_LENGTH"] + 1), "max_tokens": 1}
    resp = client.post("/submit", json=big)
    assert resp.status_code == 413 and _error(resp)["code"] == "request_entity_too_large"


def test_unreachable_redis_is_503_with_retry_after(registry_dir):
    from azu.cli.up import free_port
    from web import create_app

    app = create_app({"TESTING": True, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                      "AZU_BILLING": FreeBilling()})
    for method, path in [("post", "/submit"), ("get", "/results/job-x"),
                         ("get", "/models/status?model_id=a/b")]:
        resp = getattr(app.test_client(), method)(path, json=OK_SUBMIT)
        assert resp.status_code == 503, (path, resp.get_data(as_text=True))
        assert int(resp.headers["Retry-After"]) >= 1
        assert _error(resp)["type"] == "service_unavailable"


# --- authentication and payment go through the billing seam -----------------------------------------------
class KeyBilling(FreeBilling):
    """Two users told apart by API key, and one who cannot pay. Stands in for the ledger (which has its
    own tests in tests/ledger) so that these tests are about what the routes do with the seam's answers."""

    users = {"key-alice": "alice", "key-bob": "bob", "key-broke": "broke"}

    def __init__(self) -> None:
        self.holds: list[dict] = []
        self.released: list[str] = []

    def authenticate(self, api_key):
        try:
            return self.users[api_key]
        except KeyError:
            raise Unauthorized("unknown or revoked API key") from None

    def hold(self, *, user_id, job_id, model_id, max_token_layers):
        if user_id == "broke":
            raise PaymentRequired(f"balance too low for {max_token_layers} token-layers")
        self.holds.append({"user_id": user_id, "job_id": job_id, "max_token_layers": max_token_layers})

    def release(self, *, job_id):
        self.released.append(job_id)


@pytest.fixture
def billed(redis_url, registry_dir, r):
    from web import create_app

    r.flushdb()
    billing = KeyBilling()
    app = create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": billing})
    return app.test_client(), billing


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _fake_worker(r, worker_id: str = "idle-worker") -> None:
    """A directory entry with room for the model but no process behind it: a job can be placed (and its load
    order sent to a queue nobody reads), which is all the ownership tests need."""
    from azu.network import directory

    directory.register(r, directory.WorkerInfo(worker_id=worker_id, queue=f"gpu.{worker_id}", device="cpu",
                                               total_memory=1 << 34, free_memory=1 << 34))


def test_unknown_key_is_401_everywhere(billed):
    client, _ = billed
    for method, path in [("post", "/submit"), ("get", "/results/job-x"), ("post", "/v1/chat/completions"),
                         ("get", "/v1/models"), ("post", "/models/shard")]:
        resp = getattr(client, method)(path, json=OK_SUBMIT, headers=_auth("stolen"))
        assert resp.status_code == 401, path
    resp = client.get("/v1/models")  # no key at all
    assert resp.status_code == 401
    assert resp.get_json()["error"]["type"] == "authentication_error"


def test_payment_required_passes_through_and_nothing_is_enqueued(billed, r):
    client, _ = billed
    _fake_worker(r)
    resp = client.post("/submit", json=OK_SUBMIT, headers=_auth("key-broke"))
    assert resp.status_code == 402
    assert "balance too low" in resp.get_json()["error"]["message"]
    assert not r.keys("azu:job:*")


def test_hold_covers_prompt_and_budget_and_is_released_when_enqueue_fails(billed, r, tokenizer):
    client, billing = billed
    resp = client.post("/submit", json=OK_SUBMIT, headers=_auth("key-alice"))  # no worker: no capacity
    assert resp.status_code == 503
    assert len(billing.holds) == 1
    hold = billing.holds[0]
    assert hold["max_token_layers"] == (len(tokenizer.encode("hello")) + 4) * 8  # 8 layers in the demo
    assert billing.released == [hold["job_id"]]


def test_users_see_only_their_own_jobs(billed, r):
    client, _ = billed
    _fake_worker(r)
    resp = client.post("/submit", json=OK_SUBMIT, headers=_auth("key-alice"))
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["job_id"]
    assert resp.get_json()["results_url"] == f"/results/{job_id}"
    mine = client.get(f"/results/{job_id}", headers=_auth("key-alice"))
    assert mine.status_code == 200
    assert mine.get_json()["status"] == "queued" and mine.get_json()["token_ids"] == []
    theirs = client.get(f"/results/{job_id}", headers=_auth("key-bob"))
    assert theirs.status_code == 404
    assert client.get("/results/job-none", headers=_auth("key-alice")).status_code == 404


# --- the registry's files ---------------------------------------------------------------------------------
def test_registry_serves_only_manifest_files(client, registry_dir):
    manifest = json.loads((registry_dir / MODEL_ID / "manifest.json").read_text())
    entry = manifest["files"][0]
    name = entry["name"]
    for url in (f"/models/files/{name}?model_id={MODEL_ID}", f"/models/{MODEL_ID}/files/{name}"):
        resp = client.get(url)
        assert resp.status_code == 200
        assert hashlib.sha256(resp.data).hexdigest() == entry["sha256"] == resp.headers["X-Azu-Sha256"]
    resp = client.get(f"/models/{MODEL_ID}/files/manifest.json")
    assert resp.status_code == 200 and resp.get_json()["model_id"] == MODEL_ID
    extra = manifest["extra_files"][0]["name"]
    assert client.get(f"/models/{MODEL_ID}/files/{extra}").status_code == 200
    # A file that exists in the folder but is not in the manifest, traversal in every spelling, other models.
    (registry_dir / MODEL_ID / "secret.txt").write_text("not for you")
    for url in (f"/models/{MODEL_ID}/files/secret.txt",
                f"/models/{MODEL_ID}/files/..%2F..%2Fetc%2Fpasswd",
                f"/models/files/..%2Fmanifest.json?model_id={MODEL_ID}",
                "/models/files/passwd?model_id=..%2F..%2Fetc",
                f"/models/..%2F{MODEL_ID}/files/config.json",
                f"/models/../{MODEL_ID}/files/config.json",
                "/models/nobody/files/config.json"):
        resp = client.get(url)
        assert 400 <= resp.status_code < 500, url
        assert b"not for you" not in resp.data and b"root:" not in resp.data


def test_shard_status_routes(client, r):
    resp = client.get("/models/status")
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "model_id"
    assert client.get("/models/status?model_id=nobody/nothing").status_code == 404
    resp = client.get(f"/models/status?model_id={MODEL_ID}")
    assert resp.status_code == 200 and resp.get_json()["state"] == "ready"
    # Asking for a ready model again does not re-shard it.
    resp = client.post("/models/shard", json={"model_id": MODEL_ID})
    assert resp.status_code == 200 and resp.get_json()["state"] == "ready"
    models = client.get("/v1/models").get_json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID]


def test_a_model_whose_roomy_workers_failed_to_load_it_is_503_until_their_back_off_ends(client, r):
    """The only worker with room for the model failed to load it a moment ago (the collector took the span
    off its ``assigned`` set): placement orders it nothing until its back-off ends, so a submit is refused
    with the time to wait, and stores nothing. (It used to be stored waiting for orders nobody would send,
    and failed by the load deadline ten minutes later.) After the back-off the job waits for the load,
    ordered again."""
    import time

    from azu.engine.span import Span
    from azu.network import jobs, keys
    from azu.registry.status import model_info

    _fake_worker(r, "failed-loader")
    whole = Span(0, model_info(r, MODEL_ID).num_layers, True, True)
    field = jobs._order_field("failed-loader", whole)
    r.hset(keys.orders(MODEL_ID), field, str(time.time() - 5))  # ordered 5 s ago; its load failed since
    resp = client.post("/submit", json=OK_SUBMIT)
    assert resp.status_code == 503, resp.get_json()
    err = _error(resp)
    assert err["code"] == "no_capacity" and err["param"] == "model"
    assert "failed-loader" in err["message"] and "load of it failed" in err["message"]
    assert 55 <= int(resp.headers["Retry-After"]) <= jobs.FAILED_LOAD_BACKOFF_S  # its back-off, begun now
    assert not r.keys("azu:job:*") and not r.zcard(keys.waiting(MODEL_ID))
    assert not r.sismember(keys.assigned("failed-loader"), jobs.span_key(MODEL_ID, whole))  # no new order
    # Its back-off ended: the job waits, and the worker is ordered the model again.
    r.hset(keys.orders(MODEL_ID), field, f"failed:{time.time() - jobs.FAILED_LOAD_BACKOFF_S - 1}")
    resp = client.post("/submit", json=OK_SUBMIT)
    assert resp.status_code == 202, resp.get_json()
    assert r.zcard(keys.waiting(MODEL_ID)) == 1
    assert r.sismember(keys.assigned("failed-loader"), jobs.span_key(MODEL_ID, whole))


def test_a_submit_leaves_the_load_orders_of_workers_it_did_not_read_in_flight(client, r, monkeypatch):
    """A submit that finds the model unserved looks at its load orders for failed loads, reading the holders
    and the 64 roomiest workers. A worker loading the model reports less room and may not be among them;
    its order is still in flight. The look writes nothing (the orders' bookkeeping is placement's, under the
    model's lock, and placement reads the ordered workers too): the order stays, and the span is not ordered
    a second time elsewhere."""
    from azu.engine.span import Span
    from azu.network import directory, jobs, keys
    from azu.registry.status import model_info

    monkeypatch.setenv("AZU_COPIES", "1")  # one copy: any other order would be that span ordered twice
    for i in range(70):
        _fake_worker(r, f"roomy-{i:02d}")
    # Its room is being filled by the load: the least of all.
    directory.register(r, directory.WorkerInfo(worker_id="loading", queue="gpu.loading", device="cpu",
                                               total_memory=1 << 34, free_memory=0))
    whole = Span(0, model_info(r, MODEL_ID).num_layers, True, True)
    jobs.order_load(r, "loading", MODEL_ID, whole, dispatch=jobs.get_dispatcher())
    r.delete(keys.loading(MODEL_ID))  # as after another load of the model failed
    resp = client.post("/submit", json=OK_SUBMIT)
    assert resp.status_code == 202, resp.get_json()
    assert [keys.as_str(f) for f in r.hkeys(keys.orders(MODEL_ID))] == [jobs._order_field("loading", whole)]
