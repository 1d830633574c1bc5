"""``azu key``, ``azu deposit``, ``azu balance``, ``azu payouts``: the money flow from a terminal.

They talk to a running network (``azu up``) the way a user's wallet would: sign a sign-in challenge with a
local key to get an API key, send a transfer to the platform address on the chain and claim it with
``POST /deposit``, read ``GET /balance``, and watch worker wallets receive their payouts on chain.

Where things are comes from ``<state-dir>/local.json`` (written by ``azu up``)::

    {"base_url": ..., "chain": {"rpc_url", "chain_id", "platform_address", "unit", "decimals",
                                "accounts": [{"address", "private_key"}], "worker_wallets": {id: address}}}

or from flags. API keys made by ``azu key`` are kept in ``<state-dir>/keys.json`` (mode 0600), by address.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azu.waiting import wait_until

DEFAULT_STATE_DIR = ".azu"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
HTTP_TIMEOUT_S = 30.0
_PRIORITY_FEE = 10**9  # 1 gwei, when the node has no eth_maxPriorityFeePerGas


class CliError(Exception):
    """A failure to report in one line (exit code 1)."""


# --- arguments -------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR),
                        help="where azu up wrote local.json; keys.json is kept here too "
                        "(default %(default)s)")
    parser.add_argument("--base-url", default=None,
                        help=f"the API (default: local.json's base_url, else {DEFAULT_BASE_URL})")


def _signer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", type=int, default=0,
                        help="which test account of the dev chain signs: its index in local.json's "
                        "chain.accounts (default %(default)s)")
    parser.add_argument("--private-key", default=None,
                        help="sign with this key instead of a test account (hex); prefer --private-key-file")
    parser.add_argument("--private-key-file", type=Path, default=None,
                        help="read the signing key (hex) from this file")


def _chain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpc-url", default=None, help="the chain's JSON-RPC URL (default: local.json's)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One module serves several subcommands; argparse names each subparser "azu <command>".
    command = parser.prog.rsplit(" ", 1)[-1]
    _common(parser)
    if command == "key":
        _signer(parser)
        parser.add_argument("--label", default="azu key",
                            help="a name for the key, shown by GET /auth/keys (default %(default)r)")
    elif command == "deposit":
        parser.add_argument("amount", metavar="AMOUNT",
                            help="how much to deposit, in HYPE (\"0.5\"), or in wei with --wei")
        parser.add_argument("--wei", action="store_true", help="AMOUNT is in wei (base units)")
        _signer(parser)
        _chain(parser)
        parser.add_argument("--to", default=None,
                            help="the platform's deposit address "
                                 "(default: local.json's chain.platform_address)")
        parser.add_argument("--timeout", type=float, default=60.0,
                            help="seconds to wait for the transaction to be mined and credited "
                                 "(default %(default)g)")
    elif command == "balance":
        _signer(parser)
        parser.add_argument("--api-key", default=None,
                            help="the API key (default: the one azu key saved for --account)")
    elif command == "payouts":
        _chain(parser)
        parser.add_argument("--wallet", action="append", default=None, metavar="ADDRESS",
                            help="a worker wallet to show (repeatable; default: local.json's worker wallets)")
        parser.add_argument("--watch", action="store_true",
                            help="keep watching; print each payout as it lands")
        parser.add_argument("--interval", type=float, default=2.0,
                            help="seconds between looks with --watch (default %(default)g)")
        parser.add_argument("--timeout", type=float, default=0.0,
                            help="with --watch, stop after this many seconds "
                                 "(default %(default)g: until Ctrl-C)")
        parser.add_argument("--blocks", type=int, default=5000,
                            help="how many recent blocks to search for payouts at the start "
                                 "(default %(default)s)")


# --- where things are ------------------------------------------------------------------------------
@dataclass
class Context:
    state_dir: Path
    local: dict[str, Any]

    @classmethod
    def load(cls, state_dir: Path) -> Context:
        path = state_dir / "local.json"
        local: dict[str, Any] = {}
        if path.is_file():
            try:
                local = json.loads(path.read_text())
            except ValueError as exc:
                raise CliError(f"{path} is not valid JSON: {exc}") from None
        return cls(state_dir, local if isinstance(local, dict) else {})

    @property
    def chain(self) -> dict[str, Any]:
        chain = self.local.get("chain")
        return chain if isinstance(chain, dict) else {}

    def base_url(self, flag: str | None) -> str:
        return (flag or self.local.get("base_url") or DEFAULT_BASE_URL).rstrip("/")

    def rpc_url(self, flag: str | None) -> str:
        url = flag or self.chain.get("rpc_url")
        if not url:
            raise CliError(f"no chain: start one with `azu up` (it writes {self.state_dir / 'local.json'}) "
                           "or pass --rpc-url")
        return str(url)

    def decimals(self) -> int:
        return int(self.chain.get("decimals", 18))

    def unit(self) -> str:
        return str(self.chain.get("unit", "HYPE"))

    def keys_path(self) -> Path:
        return self.state_dir / "keys.json"

    def saved_keys(self) -> dict[str, Any]:
        try:
            data = json.loads(self.keys_path().read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_key(self, address: str, entry: dict[str, Any]) -> Path:
        keys = self.saved_keys()
        keys[address] = entry
        path = self.keys_path()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        # Created 0600: an API key spends the account's balance.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(keys, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _local_account(ctx: Context, args: argparse.Namespace) -> Any:
    """The signing account (eth-account LocalAccount): --private-key(-file), else test account --account."""
    from eth_account import Account

    from azu.payments.hyperliquid import parse_private_key

    raw = args.private_key
    if args.private_key_file is not None:
        raw = args.private_key_file.read_text()
    if raw:
        try:
            return parse_private_key(raw)
        except ValueError as exc:
            raise CliError(str(exc).replace("SCHEDULER_PRIVATE_KEY", "the private key")) from None
    accounts = ctx.chain.get("accounts")
    if isinstance(accounts, list) and accounts:
        if not 0 <= args.account < len(accounts):
            raise CliError(f"--account must be 0..{len(accounts) - 1}")
        return Account.from_key(accounts[args.account]["private_key"])
    # No local.json: the dev chain's accounts are the well-known test mnemonic's, derivable anywhere.
    from azu.payments.devchain import derive_accounts

    if args.account < 0:
        raise CliError("--account must not be negative")
    return Account.from_key(derive_accounts(range(args.account, args.account + 1))[0].private_key)


def _display(amount: int, ctx: Context) -> str:
    decimals = ctx.decimals()
    whole, frac = divmod(amount, 10**decimals)
    frac_s = f"{frac:0{decimals}d}".rstrip("0")
    return f"{whole}{'.' + frac_s if frac_s else ''} {ctx.unit()}"


# --- HTTP ------------------------------------------------------------------------------------------
def _api(method: str, url: str, *, body: Any = None, api_key: str | None = None) -> tuple[int, Any]:
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.request(method, url, json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise CliError(f"cannot reach {url.split('/', 3)[:3][-1]} ({type(exc).__name__}): is `azu up` "
                       "running? (--base-url)") from None
    try:
        data = resp.json()
    except ValueError:
        data = resp.text
    return resp.status_code, data


def _api_ok(method: str, url: str, *, body: Any = None, api_key: str | None = None) -> Any:
    status, data = _api(method, url, body=body, api_key=api_key)
    if status >= 400:
        raise CliError(f"{method} {url} answered {status}: {_error_message(data)}")
    return data


def _error_message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message"))
    return str(data)[:300]


def _web3(rpc_url: str) -> Any:
    from web3 import Web3

    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": HTTP_TIMEOUT_S}))


def _wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.25) -> Any:
    return wait_until(condition, timeout=timeout, what=what, interval=interval, error=CliError)


# --- the commands ----------------------------------------------------------------------------------
def cmd_key(ctx: Context, args: argparse.Namespace) -> int:
    from eth_account.messages import encode_defunct

    account = _local_account(ctx, args)
    base = ctx.base_url(args.base_url)
    challenge = _api_ok("POST", f"{base}/auth/challenge", body={"address": account.address})["challenge"]
    signature = account.sign_message(encode_defunct(text=challenge)).signature.to_0x_hex()
    created = _api_ok("POST", f"{base}/auth/keys", body={
        "address": account.address, "challenge": challenge, "signature": signature, "label": args.label})
    path = ctx.save_key(created["address"], {"key": created["key"], "id": created["id"], "base_url": base})
    print(f"address  {created['address']}")
    print(f"API key  {created['key']}")
    print(f"(shown once by the API; saved in {path} for `azu balance`)")
    return 0


def _parse_amount(text: str, *, wei: bool, decimals: int) -> int:
    from azu.billing.economics import parse_amount

    raw = text.strip()
    try:
        if wei:
            amount = int(raw)
        else:  # whole coins: parse_amount reads a value with a decimal point as coins, exactly
            amount = parse_amount(raw if "." in raw or "e" in raw.lower() else raw + ".0", decimals=decimals)
    except ValueError as exc:
        raise CliError(f"AMOUNT: {exc}" if not wei else f"AMOUNT: {raw!r} is not a whole number of wei") \
            from None
    if amount <= 0:
        raise CliError("AMOUNT must be positive")
    return amount


def cmd_deposit(ctx: Context, args: argparse.Namespace) -> int:
    amount = _parse_amount(args.amount, wei=args.wei, decimals=ctx.decimals())
    account = _local_account(ctx, args)
    to = args.to or ctx.chain.get("platform_address")
    if not to:
        raise CliError("no platform address: pass --to or start the network with `azu up`")
    w3 = _web3(ctx.rpc_url(args.rpc_url))
    from eth_utils import is_address, to_checksum_address

    if not is_address(to):
        raise CliError(f"--to {to!r} is not an EVM address")
    try:
        chain_id = int(w3.eth.chain_id)
        expected = ctx.chain.get("chain_id")
        if expected is not None and int(expected) != chain_id:
            raise CliError(f"the RPC node is chain {chain_id}, local.json says {expected}: refusing to sign")
        have = int(w3.eth.get_balance(account.address))
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas")
        tx: dict[str, Any] = {"to": to_checksum_address(to), "value": amount, "gas": 21_000,
                              "nonce": int(w3.eth.get_transaction_count(account.address, "pending")),
                              "chainId": chain_id}
        if base_fee is None:
            tx["gasPrice"] = int(w3.eth.gas_price)
        else:
            tip = _PRIORITY_FEE
            with contextlib.suppress(Exception):  # eth_maxPriorityFeePerGas is optional
                tip = int(w3.eth.max_priority_fee)
            tx.update(type=2, maxFeePerGas=2 * int(base_fee) + tip, maxPriorityFeePerGas=tip)
        fee_cap = tx["gas"] * (tx.get("maxFeePerGas") or tx["gasPrice"])
        if have < amount + fee_cap:
            raise CliError(f"{account.address} holds {_display(have, ctx)}, not enough for "
                           f"{_display(amount, ctx)} plus gas")
        signed = account.sign_transaction(tx)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex()
        print(f"sent {_display(amount, ctx)} from {account.address} to {tx['to']}: {tx_hash}")
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=args.timeout, poll_latency=0.25)
    except CliError:
        raise
    except Exception as exc:  # the node refused or is unreachable: say so in one line
        raise CliError(f"the chain said: {type(exc).__name__}: {str(exc)[:300]}") from None
    if int(receipt["status"]) != 1:
        raise CliError(f"transaction {tx_hash} failed on chain")
    base = ctx.base_url(args.base_url)
    body = {"tx_sig": tx_hash, "user_pubkey": account.address}

    def credited() -> dict[str, Any] | None:
        status, data = _api("POST", f"{base}/deposit", body=body)
        if status == 409:  # not confirmed enough yet: the API says retry
            return None
        if status >= 400:
            raise CliError(f"POST /deposit answered {status}: {_error_message(data)}")
        return data if isinstance(data, dict) else None

    result = _wait_for(credited, timeout=args.timeout, what="the deposit to be confirmed and credited")
    print(f"credited {_display(int(result['amount']), ctx)} to {result['address']}")
    print(f"balance  {_display(int(result['balance']), ctx)} ({result['balance']} wei)")
    return 0


def cmd_balance(ctx: Context, args: argparse.Namespace) -> int:
    api_key = args.api_key
    if not api_key:
        account = _local_account(ctx, args)
        saved = ctx.saved_keys().get(account.address)
        api_key = saved.get("key") if isinstance(saved, dict) else None
        if not api_key:
            raise CliError(f"no API key saved for {account.address}: run `azu key` first (or pass --api-key)")
    data = _api_ok("GET", f"{ctx.base_url(args.base_url)}/balance", api_key=api_key)
    print(f"address  {data['address']}")
    print(f"balance  {_display(int(data['balance']), ctx)} ({data['balance']} wei)")
    print(f"held     {_display(int(data['held']), ctx)} (reserved by running jobs)")
    return 0


class PayoutScanner:
    """Transfers from the platform address to worker wallets, found block by block."""

    def __init__(self, w3: Any, platform: str, wallets: dict[str, str], *, start_block: int) -> None:
        self.w3 = w3
        self.platform = platform.lower()
        self.wallets = {address.lower(): name for name, address in wallets.items()}
        self.next_block = max(0, start_block)

    def scan(self) -> list[dict[str, Any]]:
        found = []
        latest = int(self.w3.eth.block_number)
        for number in range(self.next_block, latest + 1):
            block = self.w3.eth.get_block(number, full_transactions=True)
            for tx in block["transactions"]:
                to = (tx.get("to") or "").lower()
                if str(tx["from"]).lower() == self.platform and to in self.wallets and int(tx["value"]) > 0:
                    found.append({"worker": self.wallets[to], "to": tx["to"], "amount": int(tx["value"]),
                                  "tx": tx["hash"].to_0x_hex(), "block": number})
        self.next_block = latest + 1
        return found


def cmd_payouts(ctx: Context, args: argparse.Namespace) -> int:
    from eth_utils import is_address, to_checksum_address

    wallets: dict[str, str] = {}
    if args.wallet:
        for address in args.wallet:
            if not is_address(address):
                raise CliError(f"--wallet {address!r} is not an EVM address")
            wallets[to_checksum_address(address)] = to_checksum_address(address)
    else:
        configured = ctx.chain.get("worker_wallets") or {}
        wallets = {str(k): to_checksum_address(v) for k, v in configured.items()}
    if not wallets:
        raise CliError("no worker wallets: pass --wallet ADDRESS or start the network with `azu up`")
    platform = ctx.chain.get("platform_address")
    if not platform:
        raise CliError("no platform address in local.json: start the network with `azu up`")
    w3 = _web3(ctx.rpc_url(args.rpc_url))
    try:
        scanner = PayoutScanner(w3, platform, wallets, start_block=int(w3.eth.block_number) - args.blocks + 1)
        print(f"payouts from the platform {platform}:")
        for name, address in wallets.items():
            label = name if name == address else f"{name} ({address})"
            print(f"  {label}: {_display(int(w3.eth.get_balance(address)), ctx)} on chain")

        def show(payouts: list[dict[str, Any]]) -> None:
            for p in payouts:
                amount = _display(p["amount"], ctx)
                print(f"  paid {amount} to {p['worker']} in block {p['block']}: {p['tx']}", flush=True)

        earlier = scanner.scan()
        show(earlier)
        if not earlier:
            print("  no payouts yet (workers are paid once their earnings pass PAYOUT_THRESHOLD)", flush=True)
        if not args.watch:
            return 0
        print(f"watching every {args.interval:g}s (Ctrl-C stops)...", flush=True)
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(args.interval)  # polling the chain on a timer: nothing here to wait on instead
            show(scanner.scan())
    except KeyboardInterrupt:
        return 0
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"the chain said: {type(exc).__name__}: {str(exc)[:300]}") from None
    return 0


COMMANDS: dict[str, Callable[[Context, argparse.Namespace], int]] = {
    "key": cmd_key, "deposit": cmd_deposit, "balance": cmd_balance, "payouts": cmd_payouts,
}


def run(args: argparse.Namespace) -> int:
    try:
        ctx = Context.load(args.state_dir)
        return COMMANDS[args.command](ctx, args)
    except CliError as exc:
        print(f"azu {args.command}: {exc}", file=sys.stderr)
        return 1
