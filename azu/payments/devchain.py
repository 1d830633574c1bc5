"""A local EVM for development: py-evm (through eth-tester) served as Ethereum JSON-RPC over HTTP.

What Hardhat's node and anvil are to Ethereum developers: funded test accounts from a well-known mnemonic, a
new block mined with every transaction (so a deposit has its confirmation at once), and a real JSON-RPC
endpoint, so the unchanged ``HyperliquidProvider`` talks to it through ``HYPERLIQUID_RPC_URL`` exactly as it
talks to a HyperEVM node.

    python -m azu.payments.devchain [--port 8545] [--chain-id 31337]

The accounts are anvil's (``test test ... junk``, path m/44'/60'/0'/0/i): their keys are public, so they
are for this chain only. The platform account (deposit receiver and payout signer) is the next one.

It binds to loopback only unless asked (``allow_remote``); requests must be ``application/json`` (a web
page cannot send those without a CORS preflight, which is never granted) and, on loopback, name a loopback
``Host`` (a DNS-rebinding page names its own): the test accounts are unlocked, as on anvil.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.backends.pyevm.main import get_default_account_state
from web3 import EthereumTesterProvider, Web3
from web3.providers.eth_tester.defaults import API_ENDPOINTS

log = logging.getLogger(__name__)

DEV_MNEMONIC = "test test test test test test test test test test test junk"  # Hardhat's and anvil's
HD_PATH = "m/44'/60'/0'/0"
DEFAULT_CHAIN_ID = 31337  # anvil's and Hardhat's: wallets know it as a local chain
DEFAULT_PORT = 8545
N_ACCOUNTS = 10
ACCOUNT_BALANCE = 10_000 * 10**18  # wei: 10,000 HYPE per test account
PLATFORM_BALANCE = 100 * 10**18  # the platform's gas for payouts; deposits come on top
WORKER_WALLET_INDEX = 1000  # worker payout wallets start here on the same path, empty, so payouts show
MAX_BODY_BYTES = 5 * 1024 * 1024
WARNING = "test accounts, never use on a real chain: their keys are public"
_LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class DevAccount:
    address: str  # EIP-55 checksummed
    private_key: str  # 0x + 64 hex digits

    def as_dict(self) -> dict[str, str]:
        return {"address": self.address, "private_key": self.private_key}


def derive_accounts(indexes: range, *, mnemonic: str = DEV_MNEMONIC) -> list[DevAccount]:
    """The accounts at ``m/44'/60'/0'/0/<index>`` of ``mnemonic`` (BIP-32/39/44, as every wallet derives)."""
    seed = seed_from_mnemonic(mnemonic, "")
    accounts = []
    for index in indexes:
        account = Account.from_key(key_from_seed(seed, f"{HD_PATH}/{index}"))
        accounts.append(DevAccount(account.address, account.key.to_0x_hex()))
    return accounts


def worker_wallet(index: int, *, mnemonic: str = DEV_MNEMONIC) -> DevAccount:
    """A payout wallet for local worker ``index``: derived from the mnemonic, starts at 0 on chain."""
    return derive_accounts(range(WORKER_WALLET_INDEX + index, WORKER_WALLET_INDEX + index + 1),
                           mnemonic=mnemonic)[0]


def is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- JSON-RPC encoding -----------------------------------------------------------------------------
_SNAKE = re.compile(r"_([a-z])")


def _camel(key: str) -> str:
    # eth-tester's result formatters leave a few keys snake_case (y_parity, state_root).
    return _SNAKE.sub(lambda m: m.group(1).upper(), key)


def to_rpc_json(value: Any, key: str = "") -> Any:
    """eth-tester's Python results as Ethereum JSON-RPC: integers as hex quantities, bytes as hex data."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if key == "logsBloom":  # a 256-byte bloom filter, which eth-tester hands back as an int
            return "0x" + value.to_bytes(256, "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {_camel(str(k)): to_rpc_json(v, _camel(str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_rpc_json(v) for v in value]
    return str(value)


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


class _Node:
    """The chain behind the HTTP server: one eth-tester, one request at a time (it is not thread-safe)."""

    def __init__(self, *, chain_id: int, mnemonic: str, n_accounts: int) -> None:
        # The test accounts, then the platform: eth-tester unlocks the first len(state) keys of the path.
        self.accounts = derive_accounts(range(n_accounts + 1), mnemonic=mnemonic)
        state = {
            bytes.fromhex(a.address[2:]): get_default_account_state(
                {"balance": PLATFORM_BALANCE if i == n_accounts else ACCOUNT_BALANCE})
            for i, a in enumerate(self.accounts)
        }
        backend = PyEVMBackend(genesis_state=state, mnemonic=mnemonic, hd_path=HD_PATH)
        # eth-tester fixes its chain id on the chain class; the instance attribute is what the VM reads
        # (ChainContext(self.chain_id)), so the chain and eth_chainId agree on ours.
        backend.chain.chain_id = chain_id
        self._tx_builder = backend.chain.get_transaction_builder()
        endpoints = {namespace: dict(methods) for namespace, methods in API_ENDPOINTS.items()}
        endpoints["eth"]["chainId"] = lambda *_: chain_id
        self.tester = EthereumTester(backend)  # auto-mines: each transaction gets its own block
        provider = EthereumTesterProvider(self.tester, api_endpoints=endpoints)
        w3 = Web3(provider, middleware=[])  # only the provider's own formatters, none of a client's
        self._request: Callable[..., Any] = provider.request_func(w3, w3.middleware_onion)
        self.chain_id = chain_id
        self.lock = threading.Lock()

    def _check_raw_transaction(self, params: Any) -> None:
        """Refuse what a real node refuses and py-evm lets through: another chain's (or no) chain id."""
        raw = params[0] if isinstance(params, list) and params and isinstance(params[0], str) else None
        if raw is None:
            return
        try:
            tx = self._tx_builder.decode(bytes.fromhex(raw.removeprefix("0x")))
        except Exception as exc:
            raise ValueError(f"invalid raw transaction: {type(exc).__name__}") from None
        chain_id = getattr(tx, "chain_id", None)
        if chain_id != self.chain_id:
            raise ValueError(f"invalid chain id: the transaction is for {chain_id}, this chain is "
                             f"{self.chain_id}")

    def call(self, request: Any) -> dict[str, Any] | None:
        """One JSON-RPC request object -> its response (None for a notification)."""
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return _error(request.get("id") if isinstance(request, dict) else None, -32600, "invalid request")
        request_id = request.get("id")
        method, params = request["method"], request.get("params", [])
        if not isinstance(params, list):
            return _error(request_id, -32602, "params must be an array")
        try:
            if method == "eth_sendRawTransaction":
                self._check_raw_transaction(params)
            with self.lock:
                if method == "eth_sendTransaction" and params and isinstance(params[0], dict) \
                        and "gas" not in params[0]:  # a node estimates the gas it is not given
                    estimate = self._request("eth_estimateGas", [params[0]])
                    if "result" in estimate:
                        params = [{**params[0], "gas": hex(int(estimate["result"]))}, *params[1:]]
                response = self._request(method, params)
        except Exception as exc:  # the node's refusal (bad nonce, revert, ...) is the caller's answer
            message = str(exc) or type(exc).__name__
            code = 3 if "revert" in message.lower() else -32000
            response = {"error": {"code": code, "message": message[:1000]}}
        if "id" not in request:
            return None
        if "error" in response:
            error = response["error"] if isinstance(response["error"], dict) else {}
            error_code = error.get("code")
            return _error(request_id, error_code if isinstance(error_code, int) else -32000,
                          str(error.get("message")))
        return {"jsonrpc": "2.0", "id": request_id, "result": to_rpc_json(response.get("result"))}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        self._send(status, json.dumps(_error(None, -32600, why)).encode())

    def do_GET(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"POST JSON-RPC requests here\n", "text/plain")

    def do_POST(self) -> None:
        if self.server.loopback_only:
            host = (self.headers.get("Host") or "").strip()
            hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not is_loopback(hostname):
                self._refuse(HTTPStatus.FORBIDDEN, "this dev chain answers only requests for a loopback host")
                return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
            return
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        if not 0 < length <= MAX_BODY_BYTES:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a request body is 1..{MAX_BODY_BYTES} bytes")
            return
        try:
            payload = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            self._send(HTTPStatus.OK, json.dumps(_error(None, -32700, "parse error")).encode())
            return
        node = self.server.node
        answer: Any
        if isinstance(payload, list):  # a batch: one answer per request that is not a notification
            if not payload:
                answer = _error(None, -32600, "empty batch")
            else:
                answer = [r for r in (node.call(item) for item in payload) if r is not None]
                if not answer:
                    self._send(HTTPStatus.NO_CONTENT, b"")
                    return
        else:
            answer = node.call(payload)
            if answer is None:
                self._send(HTTPStatus.NO_CONTENT, b"")
                return
        self._send(HTTPStatus.OK, json.dumps(answer).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], node: _Node, *, loopback_only: bool) -> None:
        self.node = node
        self.loopback_only = loopback_only
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class DevChain:
    """A running dev chain: its URL, chain id, funded test accounts and platform account."""

    def __init__(self, server: _Server, node: _Node, n_accounts: int) -> None:
        self._server = server
        self._node = node
        host, port = server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self.chain_id = node.chain_id
        self.accounts: list[DevAccount] = node.accounts[:n_accounts]
        self.platform: DevAccount = node.accounts[n_accounts]
        self._thread = threading.Thread(target=server.serve_forever, name="azu-devchain", daemon=True)
        self._thread.start()

    @property
    def tester(self) -> EthereumTester:
        """The chain itself, for tests that need to mine blocks or travel in time."""
        return self._node.tester

    def env(self) -> dict[str, str]:
        """The settings that point azu's core processes (API, scheduler) at this chain."""
        return core_env(self.info())

    def info(self, *, worker_ids: list[str] | None = None) -> dict[str, Any]:
        """The ``"chain"`` block of ``.azu/local.json`` (what ``azu key/deposit/payouts`` read)."""
        return {
            "rpc_url": self.url,
            "chain_id": self.chain_id,
            "unit": "HYPE",
            "decimals": 18,
            "warning": WARNING,
            "accounts": [a.as_dict() for a in self.accounts],
            "platform_address": self.platform.address,
            "platform_private_key": self.platform.private_key,  # public like the others: this chain only
            "worker_wallets": {w: worker_wallet(i).address for i, w in enumerate(worker_ids or [])},
        }

    def banner(self) -> str:
        """The accounts, printed the way anvil prints them."""
        lines = [f"dev chain {self.url} (chain id {self.chain_id}), one block per transaction", "",
                 f"Available accounts ({WARNING}):"]
        for i, a in enumerate(self.accounts):
            lines.append(f"  ({i}) {a.address} ({ACCOUNT_BALANCE // 10**18} HYPE)")
        lines += ["", "Private keys:"]
        lines += [f"  ({i}) {a.private_key}" for i, a in enumerate(self.accounts)]
        lines += ["", f"Platform (deposit address, payout signer): {self.platform.address}",
                  f"  key {self.platform.private_key}", "", f"Mnemonic: {DEV_MNEMONIC}",
                  f"Derivation path: {HD_PATH}/<index>"]
        return "\n".join(lines)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> DevChain:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def core_env(info: Mapping[str, Any]) -> dict[str, str]:
    """The settings that point azu's core processes (API, scheduler) at the chain ``info`` describes
    (``DevChain.info()``, or the ``--info-file`` of ``python -m azu.payments.devchain``)."""
    return {
        "PAYMENT_PROVIDER": "hyperliquid",
        "HYPERLIQUID_RPC_URL": str(info["rpc_url"]),
        "HYPERLIQUID_CHAIN_ID": str(info["chain_id"]),
        "HYPERLIQUID_ADDRESS": str(info["platform_address"]),
        "SCHEDULER_PRIVATE_KEY": str(info["platform_private_key"]),
        "MIN_CONFIRMATIONS": "1",  # a block per transaction: one confirmation is as final as it gets here
    }


def start_devchain(host: str = "127.0.0.1", port: int = 0, *, chain_id: int = DEFAULT_CHAIN_ID,
                   mnemonic: str = DEV_MNEMONIC, n_accounts: int = N_ACCOUNTS,
                   allow_remote: bool = False) -> DevChain:
    """Start a dev chain served on ``host:port`` (port 0: a free one) in a background thread.

    A host that is not loopback is refused unless ``allow_remote``: anyone who reaches it can spend the
    unlocked test accounts.
    """
    loopback = is_loopback(host)
    if not loopback and not allow_remote:
        raise ValueError(f"the dev chain binds to loopback only, not {host!r} (pass allow_remote=True / "
                         "--allow-remote to serve other machines: its accounts' keys are public)")
    if not 1 <= n_accounts <= 100:
        raise ValueError("n_accounts must be 1..100")
    node = _Node(chain_id=chain_id, mnemonic=mnemonic, n_accounts=n_accounts)
    server = _Server((host, port), node, loopback_only=loopback)
    return DevChain(server, node, n_accounts)


def write_info(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON atomically (whoever waits for the file never reads half of it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m azu.payments.devchain", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="A local EVM dev chain (py-evm) over JSON-RPC, with funded test accounts.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: a free one)")
    parser.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID, help="the chain id")
    parser.add_argument("--accounts", type=int, default=N_ACCOUNTS, help="funded test accounts")
    parser.add_argument("--workers", type=int, default=0,
                        help="list this many worker payout wallets (local-0, local-1, ...) in the info file")
    parser.add_argument("--info-file", type=Path, default=None,
                        help="once serving, write the chain's URL, id and accounts here as JSON")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host (anyone reaching it can spend the test accounts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        chain = start_devchain(args.host, args.port, chain_id=args.chain_id, n_accounts=args.accounts,
                               allow_remote=args.allow_remote)
    except (ValueError, OSError) as exc:
        print(f"devchain: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        if args.info_file is not None:
            write_info(args.info_file, chain.info(worker_ids=[f"local-{i}" for i in range(args.workers)]))
        print(chain.banner(), flush=True)
        print(f"\nListening on {chain.url}", flush=True)
        stop.wait()
    finally:
        chain.stop()
        if args.info_file is not None:
            args.info_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
