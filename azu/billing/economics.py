"""Prices and splits, in integer base units (wei for HYPE, lamports for SOL). No floats anywhere.

Pricing unit: the token-layer (one token through one transformer layer). cost = token-layers * price.

Rounding rule (stated once, used everywhere): the platform gets ``charge // 5`` (20 %, rounded DOWN) and the
workers get the rest, ``charge - charge // 5`` (so at least 80 %). With several workers, the workers' part is
split in proportion to the token-layers each ran by the largest-remainder method: everyone gets the floor of
their exact share, and the few base units left over go one each to the largest fractional remainders (ties:
the worker id that sorts first). The parts therefore always sum exactly to the charge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation

from azu.config import get_settings
from azu.errors import InvalidRequest

DEFAULT_PRICE_PER_TOKEN_LAYER = 2  # base units
PLATFORM_DIVISOR = 5  # the platform takes 1/5 = 20 %, rounded down
HYPE_DECIMALS = 18
DEFAULT_PAYOUT_THRESHOLD = 10**15  # 0.001 HYPE in wei


def price_per_token_layer() -> int:
    """``PRICE_PER_TOKEN_LAYER`` (base units, default 2)."""
    # Parsed here, not in Settings: a malformed price must break what charges, not every process start.
    raw = (get_settings().payments.price_per_token_layer or "").strip()
    if not raw:
        return DEFAULT_PRICE_PER_TOKEN_LAYER
    try:
        price = int(raw)
    except ValueError as exc:
        raise ValueError(
            f"PRICE_PER_TOKEN_LAYER must be an integer number of base units, got {raw!r}"
        ) from exc
    if price < 0:
        raise ValueError(f"PRICE_PER_TOKEN_LAYER must not be negative, got {price}")
    return price


def parse_amount(raw: str, *, decimals: int) -> int:
    """An amount in base units from text: ``"1000000000000000"`` is base units, ``"0.001"`` is whole coins.

    A value with a decimal point or an exponent ("1e-3") is whole coins, scaled by 10**decimals exactly
    (Decimal, not float), and must land on a whole base unit.
    """
    text = raw.strip()
    if "." not in text and "e" not in text.lower():
        try:
            return int(text)
        except ValueError as exc:
            raise ValueError(f"not an amount: {raw!r}") from exc
    try:
        # Enough digits for the exact result: the default 28-digit context would round large amounts.
        scaled = Decimal(text).scaleb(decimals, context=Context(prec=len(text) + decimals + 2))
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {raw!r}") from exc
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{raw!r} is finer than one base unit (10^-{decimals})")
    return int(scaled)


def payout_threshold(*, decimals: int = HYPE_DECIMALS) -> int:
    """``PAYOUT_THRESHOLD``: base units, or whole coins with a decimal point ("0.001"); default 0.001 HYPE."""
    raw = (get_settings().payments.payout_threshold or "").strip()
    if not raw:
        return DEFAULT_PAYOUT_THRESHOLD
    value = parse_amount(raw, decimals=decimals)
    if value <= 0:
        raise ValueError(f"PAYOUT_THRESHOLD must be positive, got {raw!r}")
    return value


def _non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative, got {value}", param=name)
    return value


def cost(units: int, price: int) -> int:
    """What ``units`` token-layers cost at ``price`` base units each."""
    return _non_negative("token_layers", units) * _non_negative("price", price)


def token_layers(tokens: int, layers: int) -> int:
    """THE pricing unit: ``tokens`` tokens, each through ``layers`` transformer layers."""
    return _non_negative("tokens", tokens) * _non_negative("layers", layers)


def max_token_layers(prompt_tokens: int, max_tokens: int, num_layers: int) -> int:
    """The most token-layers a job can run: every prompt token and every token that may be generated goes
    through every layer. This (times the price) is what submit holds."""
    tokens = _non_negative("prompt_tokens", prompt_tokens) + _non_negative("max_tokens", max_tokens)
    return token_layers(tokens, num_layers)


def max_job_cost(prompt_tokens: int, max_tokens: int, num_layers: int, price: int | None = None) -> int:
    """The most a job can cost: (prompt + max tokens) * layers * price."""
    unit = price_per_token_layer() if price is None else price
    return cost(max_token_layers(prompt_tokens, max_tokens, num_layers), unit)


def platform_share(charge: int) -> int:
    return _non_negative("charge", charge) // PLATFORM_DIVISOR


def split_workers(total: int, usage: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` base units in proportion to ``usage`` (largest remainder; sums exactly to total)."""
    _non_negative("total", total)
    weights = {worker: _non_negative(f"usage[{worker}]", tl) for worker, tl in usage.items()}
    weight_sum = sum(weights.values())
    if weight_sum == 0:
        if total:
            raise InvalidRequest("cannot split a positive amount over zero token-layers", param="usage")
        return dict.fromkeys(weights, 0)
    shares: dict[str, int] = {}
    remainders: list[tuple[int, str]] = []
    for worker in sorted(weights):
        quotient, remainder = divmod(total * weights[worker], weight_sum)
        shares[worker] = quotient
        remainders.append((remainder, worker))
    left = total - sum(shares.values())  # < number of workers with a nonzero remainder
    remainders.sort(key=lambda item: (-item[0], item[1]))
    for _, worker in remainders[:left]:
        shares[worker] += 1
    return shares


@dataclass(frozen=True)
class Settlement:
    """What a finished job moves: ``charge`` from the user, split into ``workers`` and ``platform``."""

    token_layers: int
    charge: int
    platform: int
    workers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.platform + sum(self.workers.values()) != self.charge:
            raise AssertionError("settlement parts do not sum to the charge")


def split_charge(usage: Mapping[str, int], price: int, *, cap: int | None = None) -> Settlement:
    """Charge for ``usage`` (worker id -> token-layers) at ``price``, split 80/20 by the rule above.

    ``cap`` is the job's hold: the user agreed to pay at most that, so a charge above it is cut to it
    (and the workers' part shrinks with it, still in proportion to their token-layers).
    """
    total_tl = sum(_non_negative(f"usage[{w}]", tl) for w, tl in usage.items())
    charge = cost(total_tl, price)
    if cap is not None:
        charge = min(charge, _non_negative("cap", cap))
    platform = platform_share(charge)
    return Settlement(
        token_layers=total_tl,
        charge=charge,
        platform=platform,
        workers=split_workers(charge - platform, usage),
    )
