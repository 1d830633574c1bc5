"""The page at / on a real network: a real API (gunicorn), scheduler, collector and two worker processes that
enrolled as strangers, driven by a real headless Chromium. The answer streamed into the page is the one the
API gives for the same greedy request (the workers' tokens), and the network panel shows the real workers.

(tests/web/test_page.py drives the money side of the page — keys signed by a wallet, an on-chain deposit,
billing — with a stand-in job runner; this test has no stand-in.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.support import wait_for
from tests.support.api import MODEL_ID, Network, start_network
from tests.support.browser import chromium

pytestmark = [pytest.mark.slow, pytest.mark.network]

PROMPT = "Tell me about layers."


@pytest.fixture(scope="module")
def live(redis_url, registry_dir, tmp_path_factory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("page")
    net = start_network(2, redis_url=redis_url, registry_dir=registry_dir, root=root)
    yield net
    net.group.stop()


def _text(driver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def test_the_page_streams_the_workers_answer_and_shows_them(live: Network) -> None:
    key = "any-key"  # FreeBilling: this network is not a ledger test
    expected = requests.post(
        live.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
              "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert expected
    with chromium() as driver:
        driver.get(live.base_url + "/")
        driver.execute_script("localStorage.setItem('azu.apiKey', arguments[0])", key)
        driver.get(live.base_url + "/")
        wait_for(lambda: _text(driver, "net-workers") == "2", timeout=30, what="the two live workers")
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#net-models .holder-name")]
        assert sorted(names) == sorted(live.worker_ids)
        wait_for(lambda: Select(driver.find_element(By.ID, "model")).first_selected_option.text == MODEL_ID,
                 timeout=20, what="the model list")
        for field, value in (("max-tokens", "24"), ("temperature", "0")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "chat-send").click()
        wait_for(lambda: "Done" in _text(driver, "chat-status") or "rror" in _text(driver, "chat-status"),
                 timeout=120, what="the end of the streamed answer")
        assert "Done" in _text(driver, "chat-status"), _text(driver, "chat-status")
        replies = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .assistant .text")]
        # The page renders text; the API's answer may end in whitespace the DOM does not keep.
        assert [r.strip() for r in replies] == [expected.strip()]
        assert "2 worker(s)" in _text(driver, "chat-status")
