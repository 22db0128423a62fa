"""The small-body memo: a byte budget, oldest out first, nothing over the item limit."""

from __future__ import annotations

from cache.bodies import BodyMemo


def test_bodies_are_found_by_nar_hash_and_coding() -> None:
    memo = BodyMemo(budget=100, item_max=50)
    memo.put(b"a", "zstd", b"x" * 10)
    assert memo.get(b"a", "zstd") == b"x" * 10
    assert memo.get(b"a", "none") is None and memo.get(b"b", "zstd") is None


def test_the_oldest_bodies_leave_to_keep_the_budget() -> None:
    memo = BodyMemo(budget=100, item_max=50)
    for name in (b"a", b"b", b"c"):
        memo.put(name, "zstd", name * 40)
    assert memo.get(b"a", "zstd") is None  # 120 bytes would not fit
    assert memo.get(b"b", "zstd") == b"b" * 40 and memo.get(b"c", "zstd") == b"c" * 40
    assert memo.size == 80 and len(memo) == 2


def test_a_body_over_the_item_limit_is_not_kept_and_evicts_nothing() -> None:
    memo = BodyMemo(budget=100, item_max=50)
    memo.put(b"a", "none", b"a" * 50)
    memo.put(b"big", "none", b"b" * 51)
    assert memo.get(b"big", "none") is None and memo.get(b"a", "none") == b"a" * 50


def test_putting_a_body_again_counts_it_once() -> None:
    memo = BodyMemo(budget=100, item_max=50)
    memo.put(b"a", "zstd", b"x" * 30)
    memo.put(b"a", "zstd", b"x" * 30)
    assert memo.size == 30 and len(memo) == 1
