"""Small NAR bodies a worker keeps in memory: compressed copies and plain NARs of a few KiB.

A closure is mostly such NARs, and reading one from the state directory or the store costs
more syscalls than sending it. The look-ahead reads them while the client is still busy with
the narinfos, so the NAR requests that follow are answered from memory.

Never stale: a body is named by its NAR hash and its coding, and those fix its bytes (a copy's
bytes depend only on the NAR and the zstd level, which a worker never changes). Whether the
path is still valid is the route's check, made before it asks for a body. Oldest first out,
within a byte budget.
"""

from __future__ import annotations

BUDGET = 8 * 1024 * 1024  # per worker
ITEM_MAX = 64 * 1024


class BodyMemo:
    def __init__(self, budget: int = BUDGET, item_max: int = ITEM_MAX) -> None:
        self.budget = budget
        self.item_max = item_max
        self.size = 0
        self._items: dict[tuple[bytes, str], bytes] = {}

    def get(self, nar_hash: bytes, coding: str) -> bytes | None:
        return self._items.get((nar_hash, coding))

    def put(self, nar_hash: bytes, coding: str, body: bytes) -> None:
        if len(body) > self.item_max or len(body) > self.budget:
            return
        key = (nar_hash, coding)
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old)
        while self._items and self.size + len(body) > self.budget:
            oldest = next(iter(self._items))
            self.size -= len(self._items.pop(oldest))
        self._items[key] = body
        self.size += len(body)

    def __len__(self) -> int:
        return len(self._items)
