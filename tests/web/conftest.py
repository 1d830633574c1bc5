"""Fixtures of the web page tests: a private real Redis, the demo model sharded into a registry folder, the
app with the pages blueprint, and (for the browser test) a real PostgreSQL ledger, an in-process EVM, a real
HTTP server and headless Chromium driven by selenium.

What is NOT real yet, on purpose (the network tests are being reworked meanwhile): ``chat_backend`` replaces
the worker cluster behind ``azu.network.jobs.submit_job`` with an in-process job that streams a fixed answer
through the job's real Redis event stream, and ``directory_workers`` writes two workers' directory records
(heartbeats) as workers do, without worker processes. Switching to a real network later means replacing
those two fixtures with ``tests.support.api.start_network`` (see the docstring of ``chat_backend``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Blueprint, Flask, jsonify, request

from tests.support import wait_for
from tests.support.browser import chromium
from tests.support.redis_server import private_redis
from tests.web.support import MODEL_ID, with_pages

# The stand-in's answer: every byte is one token of the demo tokenizer, so it streams in ~70 pieces.
STANDIN_ANSWER = "Layers hop from worker to worker; each one keeps its own KV cache. Done!"
STANDIN_TOKEN_EVERY_S = 0.05  # the pace of the stand-in's generation (what a worker's decode step takes)


# --- Redis and the model ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of our own on a free loopback port: no other test sees it."""
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory) -> Iterator[Path]:
    """The demo model (built by `azu demo`'s code, sharded by the real sharder)."""
    from azu.cli.demo import build_demo_model
    from azu.registry.sharder import shard_model

    src = build_demo_model(tmp_path_factory.mktemp("models") / MODEL_ID)
    root = tmp_path_factory.mktemp("registry")
    shard_model(src, root / MODEL_ID, progress=False)
    old = os.environ.get("AZU_REGISTRY_DIR")
    os.environ["AZU_REGISTRY_DIR"] = str(root)  # azu.registry.status.shard_dir reads it at call time
    yield root
    if old is None:
        os.environ.pop("AZU_REGISTRY_DIR", None)
    else:
        os.environ["AZU_REGISTRY_DIR"] = old


@pytest.fixture
def clean_redis(r: redis.Redis) -> redis.Redis:
    r.flushdb()
    return r


@pytest.fixture
def app(redis_url: str, clean_redis: redis.Redis) -> Flask:
    from azu.billing.base import FreeBilling
    from web import create_app

    return with_pages(create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": FreeBilling()}))


# --- the network behind the page ----------------------------------------------------------------------------
HELD = {"w-embed": (0, 4, True, False), "w-head": (4, 8, False, True)}  # the demo model has 8 layers


@pytest.fixture
def directory_workers(clean_redis: redis.Redis) -> Iterator[list[str]]:
    """Two workers' directory records, heartbeated every second as the collector does from a worker's
    report (STAND-IN: no worker processes), and the spans the core ordered them to load (``assigned``).

    They hold the demo model's embeddings + layers [0, 4) and layers [4, 8) + head: a complete route.
    """
    from azu.engine.span import Span
    from azu.network import directory, jobs, keys

    infos = [directory.WorkerInfo(worker_id=wid, queue=f"gpu.{wid}", device="cpu", total_memory=512 * 2**20,
                                  free_memory=384 * 2**20, stages=[(MODEL_ID, Span(*held))],
                                  started_at=time.time())
             for wid, held in HELD.items()]
    for info in infos:
        for model_id, span in info.stages:
            clean_redis.sadd(keys.assigned(info.worker_id), jobs.span_key(model_id, span))
    stop = threading.Event()

    def beat() -> None:
        while True:
            for info in infos:
                directory.register(clean_redis, info)
            if stop.wait(1.0):  # the heartbeat interval, as a worker's (AZU_HEARTBEAT_S)
                return

    thread = threading.Thread(target=beat, name="heartbeats", daemon=True)
    thread.start()
    wait_for(lambda: len(directory.live_workers(clean_redis)) == len(infos), timeout=10, what="heartbeats")
    yield list(HELD)
    stop.set()
    thread.join(timeout=10)


@dataclass
class ChatBackend:
    answer: str
    jobs: list[str]


@pytest.fixture
def chat_backend(monkeypatch: pytest.MonkeyPatch, registry_dir: Path, clean_redis: redis.Redis,
                 app_billing: Any) -> Iterator[ChatBackend]:
    """STAND-IN for the worker cluster: ``azu.network.jobs.submit_job`` is replaced by an in-process job that
    publishes ``STANDIN_ANSWER`` token by token into the job's real Redis event stream (ids ``0-<step+1>``,
    the ``step`` counter, a done event with usage per worker), then ends the job and settles its hold with
    the app's real ledger billing (what the scheduler's settle task does from the core's end record).
    Everything before (the API's auth, hold, tokenizer, SSE) and
    after (the stream reader, the ledger's settlement) is real.

    To run the page against a real network instead: start ``tests.support.api.start_network(2, ...)`` (as
    tests/api/conftest.py's ``network`` fixture does), serve its base URL to the browser, and drop this
    fixture and ``directory_workers``.
    """
    from azu.network import jobs, keys
    from azu.tokenization import load_tokenizer

    tokenizer = load_tokenizer(registry_dir / MODEL_ID)
    answer_ids = tokenizer.encode(STANDIN_ANSWER)
    started: list[str] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    r = clean_redis

    def run(req: jobs.JobRequest) -> None:
        key = keys.job(req.job_id)
        n = min(len(answer_ids), req.max_tokens)
        for step, token in enumerate(answer_ids[:n]):
            if stop.wait(STANDIN_TOKEN_EVERY_S) or r.hget(key, "cancel"):
                n = step
                break
            pipe = r.pipeline()
            pipe.xadd(keys.events(req.job_id), {"k": "token", "t": str(token)}, id=f"0-{step + 1}")
            pipe.hset(key, mapping={"step": str(step + 1), "updated": str(time.time())})
            pipe.execute()
        workers = {wid: (len(req.prompt_ids) + n) * (held[1] - held[0]) for wid, held in HELD.items()}
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                 "token_layers": sum(workers.values()), "workers": workers}
        now = str(time.time())
        pipe = r.pipeline()
        done = {"k": "done", "t": "", "reason": "stop", "usage": json.dumps(usage)}
        pipe.xadd(keys.events(req.job_id), done, id=f"0-{n + 1}")
        pipe.hset(key, mapping={"status": "done", "finish_reason": "stop", "usage": json.dumps(usage),
                                "updated": now, "finished": now})
        pipe.zrem(keys.ACTIVE_JOBS, req.job_id)
        pipe.execute()
        app_billing.settle(job_id=req.job_id, usage=workers)

    def submit_job(r_: redis.Redis, req: jobs.JobRequest, **_: Any) -> None:
        now = str(time.time())
        r.hset(keys.job(req.job_id), mapping={
            "status": "running", "user_id": req.user_id, "model_id": req.model_id,
            "prompt_ids": json.dumps(req.prompt_ids), "created": now, "updated": now, "step": "0"})
        r.zadd(keys.ACTIVE_JOBS, {req.job_id: float(now)})
        started.append(req.job_id)
        thread = threading.Thread(target=run, args=(req,), name=f"stand-in {req.job_id}", daemon=True)
        threads.append(thread)
        thread.start()

    monkeypatch.setattr(jobs, "submit_job", submit_job)
    yield ChatBackend(answer=STANDIN_ANSWER, jobs=started)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)


# --- the ledger and the chain (browser test) ----------------------------------------------------------------
@pytest.fixture(scope="session")
def ledger_engine() -> Iterator[Any]:
    """A fresh database of our own on the real PostgreSQL server, migrated to head."""
    from azu.billing.ledger.db import make_engine, migrate
    from tests.support.database import create_database, drop_database

    url = create_database("azu_test_web")
    try:
        migrate(url)
        engine = make_engine(url)
        yield engine
        engine.dispose()
    finally:
        drop_database(url)


@pytest.fixture
def chain() -> Any:
    """The real Hyperliquid provider on an in-process EVM (eth-tester, py-evm)."""
    from eth_account import Account
    from web3 import EthereumTesterProvider, Web3

    from azu.payments.hyperliquid import HyperliquidProvider

    w3 = Web3(EthereumTesterProvider())
    return HyperliquidProvider(web3=w3, private_key=Account.create().key.to_0x_hex())


@pytest.fixture
def user_wallet(chain: Any) -> Any:
    """A user's wallet with a key the test holds, funded with 10 HYPE from an eth-tester account."""
    from eth_account import Account

    acct = Account.create()
    w3 = chain.w3
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": acct.address, "value": 10 * 10**18})
    return acct


@pytest.fixture
def ledger_app(redis_url: str, clean_redis: redis.Redis, ledger_engine: Any, chain: Any,
               user_wallet: Any) -> Flask:
    """The API (ledger billing, the chain above) plus the pages blueprint and a TEST-ONLY signing route,
    ``POST /_test/personal_sign``, that the page's stubbed ``window.ethereum`` calls: it signs with the
    user's key, as a wallet extension would after the user clicks "Sign"."""
    from eth_account.messages import encode_defunct

    from web import create_app

    app = with_pages(create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_LEDGER_ENGINE": ledger_engine,
                                 "AZU_PAYMENT_PROVIDER": chain}))
    wallet_bp = Blueprint("test_wallet", __name__)

    @wallet_bp.post("/_test/personal_sign")
    def personal_sign():
        body = request.get_json(force=True)
        assert body["address"].lower() == user_wallet.address.lower()
        signed = user_wallet.sign_message(encode_defunct(hexstr=body["data"]))
        return jsonify({"signature": signed.signature.to_0x_hex()})

    app.register_blueprint(wallet_bp)
    return app


@pytest.fixture
def app_billing(ledger_app: Flask) -> Any:
    from web import BILLING

    return ledger_app.extensions[BILLING]


# --- a real HTTP server and a real browser ------------------------------------------------------------------
@pytest.fixture
def live_server(ledger_app: Flask) -> Iterator[str]:
    """The app served over HTTP by werkzeug's threaded server (streams as gunicorn's threads do)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, ledger_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver
