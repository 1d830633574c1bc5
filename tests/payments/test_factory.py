from __future__ import annotations

import pytest
from eth_account import Account
from web3 import Web3

from azu.errors import InvalidRequest
from azu.payments.base import PaymentProvider
from azu.payments.factory import get_provider, register
from azu.payments.hyperliquid import HyperliquidProvider
from azu.payments.solana import SolanaProvider


def test_default_is_hyperliquid(monkeypatch: pytest.MonkeyPatch, w3: Web3) -> None:
    monkeypatch.delenv("PAYMENT_PROVIDER", raising=False)
    provider = get_provider(web3=w3, platform_address=Account.create().address)
    assert isinstance(provider, HyperliquidProvider)
    assert (provider.name, provider.decimals) == ("hyperliquid", 18)


def test_env_selects_solana(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENT_PROVIDER", "solana")
    monkeypatch.setenv("SOLANA_RPC_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SOLANA_ADDRESS", "11111111111111111111111111111111")
    provider = get_provider()
    assert isinstance(provider, SolanaProvider)
    assert (provider.name, provider.decimals, provider.platform_address) == (
        "solana", 9, "11111111111111111111111111111111")


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="unknown payment provider 'bitcoin'"):
        get_provider("bitcoin")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("hyperliquid")(type("Again", (HyperliquidProvider,), {}))
    assert issubclass(HyperliquidProvider, PaymentProvider)


def test_missing_configuration_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HYPERLIQUID_RPC_URL", "HYPERLIQUID_ADDRESS", "SCHEDULER_PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="HYPERLIQUID_RPC_URL"):
        get_provider("hyperliquid")
