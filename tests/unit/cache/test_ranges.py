import pytest

from cache.ranges import ByteRange, Unsatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "total", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 10)),
        ("bytes=90-", 100, ByteRange(90, 10)),
        ("bytes=90-1000", 100, ByteRange(90, 10)),
        ("bytes=-10", 100, ByteRange(90, 10)),
        ("bytes=-1000", 100, ByteRange(0, 100)),
        ("BYTES = 5-5", 100, ByteRange(5, 1)),
        ("bytes=0-1,5-6", 100, None),  # several ranges: whole body
        ("items=0-1", 100, None),
        ("bytes=5-2", 100, None),
        ("bytes=abc", 100, None),
        ("bytes=-", 100, None),
        ("bytes=1-x", 100, None),
        ("bytes=0-" + "9" * 5000, 100, ByteRange(0, 100)),
        ("bytes=-" + "9" * 5000, 100, ByteRange(0, 100)),
    ],
)
def test_parse(header: str | None, total: int, expected: ByteRange | None) -> None:
    assert parse_range(header, total) == expected


@pytest.mark.parametrize(
    ("header", "total"),
    [
        ("bytes=100-", 100),
        ("bytes=200-300", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=" + "1" * 5000 + "-", 100),
    ],
)
def test_unsatisfiable(header: str, total: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, total)


def test_content_range() -> None:
    assert ByteRange(90, 10).content_range(100) == "bytes 90-99/100"
