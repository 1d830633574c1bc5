from __future__ import annotations

import random
from fractions import Fraction

import pytest

from azu.billing import economics
from azu.errors import InvalidRequest


def test_single_worker_gets_80_platform_20() -> None:
    s = economics.split_charge({"w1": 500}, 2)
    assert (s.token_layers, s.charge, s.platform, s.workers) == (500, 1000, 200, {"w1": 800})


def test_platform_share_rounds_down_and_workers_get_the_rest() -> None:
    # 7 // 5 = 1 to the platform, 6 to the worker (the rule stated in azu/billing/economics.py)
    s = economics.split_charge({"w1": 7}, 1)
    assert (s.charge, s.platform, s.workers["w1"]) == (7, 1, 6)
    s = economics.split_charge({"w1": 1}, 1)
    assert (s.charge, s.platform, s.workers["w1"]) == (1, 0, 1)


def test_largest_remainder_split_between_workers() -> None:
    # 10 base units over three equal workers: 3 each plus 1 left, which goes to the first id on a tie
    assert economics.split_workers(10, {"b": 1, "a": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    # exact shares 8*2/3 = 5.33 and 8*1/3 = 2.67: floors 5 and 2, the leftover unit to the larger remainder
    assert economics.split_workers(8, {"x": 2, "y": 1}) == {"x": 5, "y": 3}
    s = economics.split_charge({"gpu-a": 300, "gpu-b": 100}, 3)  # 1200: platform 240, workers 960 split 3:1
    assert (s.charge, s.platform, s.workers) == (1200, 240, {"gpu-a": 720, "gpu-b": 240})


def test_random_splits_sum_exactly_and_stay_within_one_unit_of_the_exact_share() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        usage = {f"w{i}": rng.randint(0, 10**6) for i in range(rng.randint(1, 7))}
        if not any(usage.values()):
            continue
        price = rng.choice([1, 2, 3, 7, 10**9 + 7])
        s = economics.split_charge(usage, price)
        assert s.charge == sum(usage.values()) * price
        assert s.platform == s.charge // 5
        assert s.platform + sum(s.workers.values()) == s.charge
        pool = s.charge - s.platform
        total = sum(usage.values())
        for worker, tl in usage.items():
            exact = Fraction(pool * tl, total)
            assert exact - 1 < s.workers[worker] < exact + 1


def test_charge_is_capped_at_the_hold() -> None:
    s = economics.split_charge({"a": 600, "b": 400}, 2, cap=1000)
    assert s.charge == 1000 and s.platform == 200 and s.workers == {"a": 480, "b": 320}


def test_max_job_cost_and_bad_input() -> None:
    assert economics.max_job_cost(10, 20, 24, 2) == 30 * 24 * 2
    with pytest.raises(InvalidRequest):
        economics.max_job_cost(-1, 20, 24, 2)
    with pytest.raises(InvalidRequest):
        economics.split_charge({"a": -5}, 2)
    with pytest.raises(InvalidRequest):
        economics.cost(10, 1.5)  # type: ignore[arg-type]


def test_token_layers_is_the_one_formula() -> None:
    assert economics.token_layers(7, 3) == 21
    assert economics.max_token_layers(10, 20, 24) == economics.token_layers(30, 24) == 720
    with pytest.raises(InvalidRequest, match="layers"):
        economics.token_layers(1, -1)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        economics.max_token_layers(1, -2, 4)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRICE_PER_TOKEN_LAYER", raising=False)
    monkeypatch.delenv("PAYOUT_THRESHOLD", raising=False)
    assert economics.price_per_token_layer() == 2
    assert economics.payout_threshold() == 10**15
    monkeypatch.setenv("PRICE_PER_TOKEN_LAYER", "5")
    assert economics.price_per_token_layer() == 5
    assert economics.max_job_cost(1, 1, 1) == 10
    monkeypatch.setenv("PAYOUT_THRESHOLD", "0.25")
    assert economics.payout_threshold() == 25 * 10**16
    assert economics.payout_threshold(decimals=9) == 25 * 10**7
    monkeypatch.setenv("PAYOUT_THRESHOLD", "123")
    assert economics.payout_threshold() == 123
    monkeypatch.setenv("PAYOUT_THRESHOLD", "0.0000000000000000001")
    with pytest.raises(ValueError, match="finer than one base unit"):
        economics.payout_threshold()
    monkeypatch.setenv("PRICE_PER_TOKEN_LAYER", "2.5")
    with pytest.raises(ValueError, match="PRICE_PER_TOKEN_LAYER"):
        economics.price_per_token_layer()
