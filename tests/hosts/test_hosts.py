"""The core and each worker on its own host (a network namespace each, joined by a bridge): nothing reaches
anything over loopback. The answer through both workers must equal transformers' greedy one, directly and
with a relay that delays every chunk between the workers and the core; a worker whose link is cut mid-answer
ends the job with a clear error event.
"""

from __future__ import annotations

import json
import sys

import pytest
import requests

from tests.support.hosts import MODEL_ID, REDIS_PORT, HostNetwork, core_relays, start_host_network

pytestmark = [pytest.mark.network, pytest.mark.slow]

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, who are you?"}]
HEADERS = {"Authorization": "Bearer test-key"}


def _chat(net: HostNetwork, max_tokens: int) -> dict:
    resp = requests.post(net.api_url + "/v1/chat/completions", headers=HEADERS, timeout=180,
                         json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": max_tokens,
                               "temperature": 0})
    assert resp.status_code == 200, resp.text + "\n" + net.log_tail()
    return resp.json()


def _check_greedy(net: HostNetwork, tokenizer, reference, max_tokens: int = 12) -> None:
    prompt_ids = tokenizer.encode_chat(MESSAGES)
    expected = reference(prompt_ids, max_tokens)
    body = _chat(net, max_tokens)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(expected)
    assert body["usage"]["completion_tokens"] == len(expected)


def _workers_used(net: HostNetwork) -> None:
    """Each worker ran part of the model: the split really crossed hosts."""
    import redis

    from azu.network import directory

    live = {w.worker_id: w for w in directory.live_workers(redis.Redis.from_url(net.redis_url))}
    assert set(net.worker_ids) <= set(live)
    assert all(live[w].stages for w in net.worker_ids), {w: live[w].stages for w in net.worker_ids}


def test_workers_on_their_own_hosts_answer_greedily(hosts, registry_dir, tokenizer, reference, tmp_path):
    net = start_host_network(hosts, registry_dir=registry_dir, root=tmp_path)
    try:
        # From a worker's host the core's Redis is at the core's address, and not on loopback.
        def reach(addr: str) -> int:
            code = f"import socket; socket.create_connection(('{addr}', {REDIS_PORT}), 2)"
            return hosts.run(hosts.workers[0], [sys.executable, "-c", code]).returncode

        assert reach(hosts.core_addr) == 0
        assert reach("127.0.0.1") != 0
        _check_greedy(net, tokenizer, reference)
        _workers_used(net)
    finally:
        net.stop()


def test_delayed_links_still_answer_greedily(hosts, registry_dir, tokenizer, reference, tmp_path):
    delay = 0.010  # each way, on every connection between a worker and the core
    with core_relays(hosts, delay_s=delay) as (rr, ra):
        net = start_host_network(hosts, registry_dir=registry_dir, root=tmp_path,
                                 public_redis=f"{hosts.host_addr}:{rr.port}",
                                 public_api=f"{hosts.host_addr}:{ra.port}")
        try:
            _check_greedy(net, tokenizer, reference)
            _workers_used(net)
            assert rr.connections > 0 and ra.connections > 0  # the workers' traffic took the delayed path
        finally:
            net.stop()


def test_cut_link_mid_answer_ends_with_an_error_event(hosts, registry_dir, tokenizer, tmp_path):
    net = start_host_network(hosts, registry_dir=registry_dir, root=tmp_path,
                             extra_env={"AZU_STEP_DEADLINE_S": "5", "AZU_WATCHDOG_INTERVAL_S": "1"})
    try:
        events: list[dict] = []
        with requests.post(net.api_url + "/v1/chat/completions", headers=HEADERS, stream=True, timeout=120,
                           json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 400,
                                 "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200, resp.text
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                events.append(event)
                if len(events) == 2:  # the answer has started: cut the second worker off
                    hosts.cut(hosts.workers[1])
        errors = [e for e in events if "error" in e]
        finishes = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
        assert errors, f"no error event after the cut; finishes: {finishes}\n{net.log_tail()}"
        assert not finishes
        assert errors[-1]["error"]["message"], errors[-1]
        print("error event after the cut:", errors[-1], "after", len(events) - 1, "chunks")
    finally:
        # The cut worker cannot finish a warm shutdown (its broker is out of reach): killed after a short
        # wait instead of the whole default one.
        net.stop(timeout=3)
