"""The in-process EVM of the payment and payout tests (web3's EthereumTesterProvider over py-evm), with
faults injected at the JSON-RPC boundary the provider talks to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from web3 import EthereumTesterProvider, Web3

# init code that deploys a contract whose every call reverts (runtime: PUSH1 0 PUSH1 0 REVERT)
REVERTING_CONTRACT_INIT = "0x6005600c60003960056000f360006000fd"


def deploy_reverting_contract(w3: Web3) -> str:
    deployer = w3.eth.accounts[0]
    tx = w3.eth.send_transaction({"from": deployer, "data": REVERTING_CONTRACT_INIT, "gas": 200_000})
    address = w3.eth.get_transaction_receipt(tx)["contractAddress"]
    assert address is not None
    return str(address)


class Crash(BaseException):
    """Raised by the fault injector to stand for the process dying at that instant."""


class FaultyChain(EthereumTesterProvider):
    """The real eth-tester provider with faults injected per JSON-RPC call (the node/transport boundary)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset_faults()

    def reset_faults(self) -> None:
        self.down = False  # every request fails as if the node were unreachable
        self.refuse_sends = 0  # the next N eth_sendRawTransaction fail before reaching the chain
        self.lose_send_answers = 0  # the next N sends execute on chain, then their answer is lost
        self.down_after_send = False  # ... and the node stays unreachable afterwards
        self.crash_after_send = 0  # the next N sends execute, then the process "dies"
        self.pending_nonce_skew = 0  # added to eth_getTransactionCount(..., "pending") answers
        self.fail_methods: set[str] = set()  # these methods fail as if the node were unreachable
        self.before_send: Callable[[], None] | None = None

    def make_request(self, method: Any, params: Any) -> Any:
        if self.down or method in self.fail_methods:
            raise requests.ConnectionError(f"injected: {method} unreachable")
        if method == "eth_sendRawTransaction":
            if self.before_send is not None:
                self.before_send()
            if self.refuse_sends:
                self.refuse_sends -= 1
                raise requests.ConnectionError("injected: connection reset before the node got it")
            response = super().make_request(method, params)
            if self.crash_after_send:
                self.crash_after_send -= 1
                raise Crash("injected: process died right after sending")
            if self.lose_send_answers:
                self.lose_send_answers -= 1
                self.down = self.down_after_send
                raise requests.ReadTimeout("injected: answer lost after sending")
            return response
        response = super().make_request(method, params)
        if method == "eth_getTransactionCount" and params[1] == "pending" and self.pending_nonce_skew:
            response = {**response, "result": response["result"] + self.pending_nonce_skew}
        return response
