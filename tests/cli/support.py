"""What the CLI tests share with their fixtures (tests/cli/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from azu.payments.devchain import DevChain
from azu.payments.hyperliquid import HyperliquidProvider

WORKERS = ["local-0", "local-1"]  # the worker ids `azu up` gives its workers


@dataclass
class Network:
    """A running API + ledger + dev chain, and the state dir whose local.json points at them."""

    base_url: str
    chain: DevChain
    provider: HyperliquidProvider
    engine: Engine
    state_dir: Path
