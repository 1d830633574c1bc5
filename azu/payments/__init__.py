"""Chains azu is paid on: deposits in, payouts out, wallet signatures. ``get_provider()`` picks one."""

from azu.payments.base import ChainError, DepositInfo, PaymentProvider, PayoutState, SignedPayout
from azu.payments.factory import get_provider, register

__all__ = ["ChainError", "DepositInfo", "PaymentProvider", "PayoutState", "SignedPayout", "get_provider",
           "register"]
