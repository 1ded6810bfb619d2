"""Near-duplicate detection: MinHash + LSH (datasketch) for the filter, SimHash for the seed's contract."""

from __future__ import annotations

import hashlib
import re

from datasketch import MinHash, MinHashLSH

NUM_PERM = 64


def shingles(text: str, k: int = 3) -> set[str]:
    """Word k-grams of the lower-cased text (the whole text when it has fewer than k words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def minhash(text: str) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1)
    for s in shingles(text):
        m.update(s.encode("utf-8"))
    return m


class NearDuplicateIndex:
    """Texts seen so far; `seen(text)` says whether a new text is within Jaccard `threshold` of one."""

    def __init__(self, threshold: float):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.count = 0
        self.exact: set[str] = set()

    def seen_exact(self, key: str) -> bool:
        return key in self.exact

    def add_exact(self, key: str) -> None:
        self.exact.add(key)

    def seen(self, text: str) -> bool:
        return bool(self.lsh.query(minhash(text)))

    def add(self, text: str) -> None:
        self.lsh.insert(f"t{self.count}", minhash(text))
        self.count += 1


def simhash(text: str) -> int:
    """64-bit SimHash over word 3-grams."""
    weights = [0] * 64
    for s in shingles(text) or {""}:
        h = int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if h >> bit & 1 else -1
    return sum(1 << bit for bit in range(64) if weights[bit] > 0)


def near_duplicate(h1: int, h2: int, k: int = 3) -> bool:
    """Two SimHashes are near-duplicates when they differ in at most `k` bits."""
    return (h1 ^ h2).bit_count() <= k
