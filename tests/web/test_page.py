"""The user page in a real headless Chromium, against a real HTTP server, a real Redis, the real PostgreSQL
ledger and the real Hyperliquid provider on an in-process EVM.

A user with a funded wallet opens ``/``, creates an API key by signing the server's challenge with their
wallet, claims a deposit they really sent on chain, streams a chat answer, sees their balance charged, revokes
a key, and watches the network panel (workers, who holds which layers, tokens/s).

STAND-INS (see tests/web/conftest.py): the worker cluster behind ``submit_job`` is ``chat_backend``, an
in-process job that streams a fixed answer through the job's real Redis event stream and settles it with the
real ledger billing; the two workers in the network panel are directory records heartbeated by
``directory_workers``, not processes. The wallet is a small ``window.ethereum`` stub in the page whose
``personal_sign`` asks a test-only route to sign with the user's key (what a wallet extension does when the
user clicks "Sign"); the signature is then checked by the real server code.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from sqlalchemy import select

from azu.billing import accounts
from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import ApiKey
from tests.support import REPO, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.chain]

SCREENSHOT = REPO / "docs" / "screenshots" / "playground.png"
HYPE = 10**18

WALLET_STUB = """
const address = arguments[0];
window.ethereum = {
  request: async ({method, params}) => {
    if (method === "eth_requestAccounts") return [address];
    if (method === "personal_sign") {
      const resp = await fetch("/_test/personal_sign", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({data: params[0], address: params[1]})});
      return (await resp.json()).signature;
    }
    throw new Error("unsupported wallet method " + method);
  },
};
"""


def text(driver: Any, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def send_to_platform(chain: Any, wallet: Any, value: int) -> str:
    w3 = chain.w3
    tx = {"to": chain.platform_address, "value": value, "gas": 21_000, "gasPrice": w3.eth.gas_price,
          "nonce": w3.eth.get_transaction_count(wallet.address), "chainId": w3.eth.chain_id}
    return w3.eth.send_raw_transaction(wallet.sign_transaction(tx).raw_transaction).to_0x_hex()


def balance_and_held(engine: Any, address: str) -> tuple[int, int]:
    with session_scope(engine) as s:
        return service.user_balance(s, address), service.held_for(s, address)


def test_user_creates_a_key_deposits_streams_an_answer_and_sees_the_network(
        browser, live_server, chat_backend, directory_workers, user_wallet, chain, ledger_engine, r):
    from azu.registry import status as shard_status

    shard_status.mark_ready(r, "azu-demo", source="azu-demo")
    driver = browser
    driver.get(live_server + "/")
    assert driver.title.startswith("azu")

    # The network panel renders from GET /network without any key.
    wait_for(lambda: driver.find_element(By.ID, "network").get_attribute("data-loaded") == "true",
             timeout=20, what="the network panel")
    assert text(driver, "net-workers") == "2"
    holders = driver.find_elements(By.CSS_SELECTOR, "#net-models .holder")
    assert [h.find_element(By.CLASS_NAME, "holder-name").text for h in holders] == directory_workers
    assert "azu-demo — 8 layers — served" in text(driver, "net-models")
    rows = driver.find_elements(By.CSS_SELECTOR, "#net-rows tr")
    assert len(rows) == 2 and "embeddings + layers [0, 4)" in rows[0].text

    # An API key, made by signing the server's challenge with the (stubbed) wallet.
    driver.execute_script(WALLET_STUB, user_wallet.address)
    driver.find_element(By.ID, "key-create").click()
    wait_for(lambda: "created" in text(driver, "keys-status") or "rror" in text(driver, "keys-status"),
             timeout=20, what="the key to be created")
    assert "created for " + user_wallet.address in text(driver, "keys-status"), text(driver, "keys-status")
    key = driver.execute_script("return localStorage.getItem('azu.apiKey')")
    assert key and key in text(driver, "key-new")
    with session_scope(ledger_engine) as s:
        stored = s.execute(select(ApiKey)).scalars().all()
        assert [(k.address, k.key_hash) for k in stored] == [(user_wallet.address,
                                                              accounts.hash_api_key(key))]
    wait_for(lambda: "in use here" in text(driver, "key-rows"), timeout=10, what="the key list")

    # A deposit really sent on chain, claimed through the form (the address is filled in from /balance).
    wait_for(lambda: driver.find_element(By.ID, "deposit-address").get_attribute("value")
             == user_wallet.address, timeout=10, what="the balance to load")
    assert text(driver, "balance-amount") == "0"
    tx = send_to_platform(chain, user_wallet, 2 * HYPE)
    driver.find_element(By.ID, "deposit-tx").send_keys(tx)
    driver.find_element(By.ID, "deposit-send").click()
    wait_for(lambda: "Credited" in text(driver, "deposit-status") or "rror" in text(driver, "deposit-status"),
             timeout=20, what="the deposit")
    assert f"Credited {2 * HYPE:,} base units of HYPE" in text(driver, "deposit-status"), \
        text(driver, "deposit-status")
    wait_for(lambda: text(driver, "balance-amount") == f"{2 * HYPE:,}", timeout=10, what="the new balance")

    # The playground streams the answer token by token into the page.
    wait_for(lambda: Select(driver.find_element(By.ID, "model")).first_selected_option.text == "azu-demo",
             timeout=10, what="the model list")
    driver.find_element(By.ID, "prompt").send_keys("How does azu run a model?")
    driver.find_element(By.ID, "chat-send").click()
    answer = chat_backend.answer
    replies = lambda: driver.find_elements(By.CSS_SELECTOR, "#messages .assistant .text")  # noqa: E731
    partial = wait_for(lambda: next((e.text for e in replies() if 0 < len(e.text) < len(answer)), None),
                       timeout=20, what="part of the answer to appear while it streams")
    assert answer.startswith(partial)
    # While it streams, the network panel measures the tokens/s from the jobs' step counters.
    tps = wait_for(lambda: _positive(text(driver, "net-tps")), timeout=15, what="a tokens/s figure above 0")
    assert tps > 0
    wait_for(lambda: "Done (stop)" in text(driver, "chat-status") or "rror" in text(driver, "chat-status"),
             timeout=30, what="the end of the stream")
    assert [e.text for e in replies()] == [answer]
    assert f"{len(answer)} completion tokens" in text(driver, "chat-status"), text(driver, "chat-status")
    assert len(chat_backend.jobs) == 1

    # The job was billed: the page shows the ledger's balance, nothing is still held.
    def charged() -> tuple[int, int] | None:
        balance, held = balance_and_held(ledger_engine, user_wallet.address)
        return (balance, held) if held == 0 and balance < 2 * HYPE else None

    balance, _ = wait_for(charged, timeout=10, what="the job to be settled")
    driver.find_element(By.ID, "balance-refresh").click()
    wait_for(lambda: text(driver, "balance-amount") == f"{balance:,}", timeout=10, what="the charged balance")
    assert text(driver, "balance-held") == "0"

    # A second key (made through the same API the page calls), revoked from the page's key list.
    other = _second_key(live_server, user_wallet)
    driver.find_element(By.ID, "keys-refresh").click()
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#key-rows tr")) == 2, timeout=10,
             what="both keys listed")
    driver.find_element(By.CSS_SELECTOR, f"button[aria-label^='Revoke key {other}']").click()
    wait_for(lambda: f"Key {other} revoked." in text(driver, "keys-status"), timeout=10,
             what="the revocation")
    with session_scope(ledger_engine) as s:
        revoked = {k.label: k.revoked_at is not None for k in s.execute(select(ApiKey)).scalars()}
    assert revoked == {"browser": False, "laptop": True}
    wait_for(lambda: "revoked" in text(driver, "key-rows"), timeout=10,
             what="the list to show the revocation")

    # A second question in the same conversation, then the page as the user sees it:
    # docs/screenshots/playground.png.
    driver.find_element(By.ID, "prompt").send_keys("And who gets paid for it?")
    driver.find_element(By.ID, "chat-send").click()
    wait_for(lambda: len(replies()) == 2 and "Done (stop)" in text(driver, "chat-status"), timeout=30,
             what="the second answer")
    assert [e.text for e in replies()] == [answer, answer]
    wait_for(lambda: _positive(text(driver, "net-tps")), timeout=15, what="tokens/s after the second answer")
    wait_for(lambda: text(driver, "balance-held") == "0", timeout=10, what="the page to see the job settled")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(_full_page_png(driver))


def _full_page_png(driver: Any) -> bytes:
    """The whole page, not just the window (Chrome DevTools' capture beyond the viewport)."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def _positive(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _second_key(base_url: str, wallet: Any) -> int:
    import requests
    from eth_account.messages import encode_defunct

    challenge = requests.post(base_url + "/auth/challenge", json={"address": wallet.address},
                              timeout=10).json()["challenge"]
    signature = wallet.sign_message(encode_defunct(text=challenge)).signature.to_0x_hex()
    body = {"address": wallet.address, "challenge": challenge, "signature": signature, "label": "laptop"}
    made = requests.post(base_url + "/auth/keys", json=body, timeout=10)
    assert made.status_code == 201, made.text
    return int(made.json()["id"])
