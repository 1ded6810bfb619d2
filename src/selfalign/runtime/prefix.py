"""The server's prefix cache: the keys and values of recent prompts, so a prompt that starts as one of them did
(a chat template's system prompt, a conversation's earlier turns, the same question again) prefills only the rest.

An entry is one prompt's keys and values on one adapter (the base, or an adapter at one attach id: a replaced
adapter's entries never match again). Because a token's keys and values depend only on the tokens before it, an
entry serves any prompt that shares a prefix with it, however long: `find` returns the longest shared prefix among
the adapter's entries (leaving the prompt at least one token of its own, whose prefill gives its first token).
Entries are kept least-recently-used first out, up to `max_tokens` tokens in all (for the 135M model about 46 KB
per token in float32; for an 8B model in bfloat16 about 128 KB).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

Key = tuple[str | None, int | None]  # (adapter, attach id); (None, None) for the base
Layers = list[tuple[Any, Any]]  # per layer, (keys, values) of shape (1, kv heads, tokens, head dim)


class PrefixCache:
    def __init__(self, max_tokens: int, min_match: int = 16):
        self.max_tokens, self.min_match = max_tokens, min_match
        self.entries: OrderedDict[tuple[Key, tuple[int, ...]], Layers] = OrderedDict()
        self.tokens = 0

    def find(self, key: Key, ids: list[int]) -> tuple[int, Layers | None]:
        """The longest prefix of `ids` (at most all but its last token) an entry on `key` holds, and that prefix's
        keys and values; (0, None) below `min_match` tokens."""
        best, hit = 0, None
        for entry in self.entries:
            if entry[0] == key:
                shared = _shared(entry[1], ids, len(ids) - 1)
                if shared > best:
                    best, hit = shared, entry
        if hit is None or best < self.min_match:
            return 0, None
        self.entries.move_to_end(hit)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[hit]]

    def add(self, key: Key, ids: list[int], layers: Layers) -> None:
        """Keep `layers` (the keys and values of all of `ids`) as an entry, dropping the least recently used."""
        entry = (key, tuple(ids))
        if entry in self.entries:
            self.entries.move_to_end(entry)
            return
        if len(ids) > self.max_tokens:
            return
        self.entries[entry] = layers
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            (_, old), _ = self.entries.popitem(last=False)
            self.tokens -= len(old)

    def drop(self, adapter: str) -> None:
        """Forget every entry on `adapter` (it was unloaded)."""
        for entry in [e for e in self.entries if e[0][0] == adapter]:
            self.tokens -= len(entry[1])
            del self.entries[entry]


def _shared(a: tuple[int, ...], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)
