"""Sticky route assignment: stable per subject, split by weight, minimal movement on reweighting."""

from __future__ import annotations

import random
from collections import Counter

from gateway.core.request import COMPLETIONS, ApiRequest
from gateway.dispatch.routing.assign import Sticky
from gateway.settings import RouteSettings

SUBJECTS = [f"user-{i}" for i in range(10_000)]


def routes(*weights: float, names: tuple[str, ...] = ("v1", "v2", "v3")) -> list[RouteSettings]:
    return [RouteSettings(("e",), "m", w, n) for w, n in zip(weights, names, strict=False)]


def assign(sticky: Sticky, rs: list[RouteSettings], model: str = "m") -> dict[str, str]:
    out = {}
    for s in SUBJECTS:
        request = ApiRequest(COMPLETIONS, model, {}, subject=s)
        out[s] = sticky.choose(request, rs).name
    return out


def test_a_subject_keeps_its_route_and_the_split_follows_the_weights() -> None:
    sticky = Sticky(random.Random(1))
    first = assign(sticky, routes(50, 50))
    assert assign(Sticky(random.Random(2)), routes(50, 50)) == first  # no state, no randomness
    counts = Counter(first.values())
    assert 4700 < counts["v1"] < 5300, counts  # 50% of 10,000 within 6 standard deviations
    skewed = Counter(assign(sticky, routes(10, 90)).values())
    assert 850 < skewed["v1"] < 1150, skewed


def test_moving_ten_percent_of_the_weight_moves_ten_percent_of_subjects() -> None:
    sticky = Sticky(random.Random(1))
    before = assign(sticky, routes(10, 90))
    after = assign(sticky, routes(20, 80))
    moved = [s for s in SUBJECTS if before[s] != after[s]]
    assert 0.085 < len(moved) / len(SUBJECTS) < 0.115, len(moved)
    assert all(before[s] == "v2" and after[s] == "v1" for s in moved)  # only towards the grown route


def test_a_route_that_is_down_loses_only_its_own_subjects() -> None:
    sticky = Sticky(random.Random(1))
    three = routes(30, 30, 40)
    before = assign(sticky, three)
    down = assign(sticky, [three[0], three[2]])  # v2 has no usable engine
    for s in SUBJECTS:
        if before[s] != "v2":
            assert down[s] == before[s]
    spread = Counter(down[s] for s in SUBJECTS if before[s] == "v2")
    assert set(spread) == {"v1", "v3"}  # v2's subjects spread over the others by weight
    assert assign(sticky, three) == before  # and come back when v2 does


def test_the_model_enters_the_hash_and_no_subject_means_weighted() -> None:
    sticky = Sticky(random.Random(1))
    a, b = assign(sticky, routes(50, 50), "m1"), assign(sticky, routes(50, 50), "m2")
    same = sum(a[s] == b[s] for s in SUBJECTS)
    assert 4700 < same < 5300  # independent assignments per model
    anonymous = Counter(sticky.choose(ApiRequest(COMPLETIONS, "m", {}), routes(50, 50)).name for _ in range(2000))
    assert 850 < anonymous["v1"] < 1150  # at random, by weight
