"""One place that maps a provider name (``PAYMENT_PROVIDER``) to its class; duplicates are refused."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from azu.config import get_settings
from azu.errors import InvalidRequest
from azu.payments.base import PaymentProvider

P = TypeVar("P", bound=type[PaymentProvider])

_REGISTRY: dict[str, type[PaymentProvider]] = {}
# Imported on first use so that naming one provider never imports the other chain's libraries.
_BUILTIN = {"hyperliquid": "azu.payments.hyperliquid", "solana": "azu.payments.solana"}


def register(name: str) -> Callable[[P], P]:
    def deco(cls: P) -> P:
        if name in _REGISTRY:
            raise ValueError(f"payment provider {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def provider_class(name: str) -> type[PaymentProvider]:
    key = name.strip().lower()
    if key not in _REGISTRY and key in _BUILTIN:
        importlib.import_module(_BUILTIN[key])
    try:
        return _REGISTRY[key]
    except KeyError:
        known = ", ".join(sorted(set(_REGISTRY) | set(_BUILTIN)))
        raise InvalidRequest(f"unknown payment provider {name!r} (known: {known})") from None


def get_provider(name: str | None = None, **overrides: Any) -> PaymentProvider:
    """The provider named ``name`` (else ``PAYMENT_PROVIDER``, default hyperliquid), configured from the
    settings; ``overrides`` are passed to its constructor and win over the settings."""
    chosen = name or get_settings().payments.provider
    return provider_class(chosen)(**overrides)
