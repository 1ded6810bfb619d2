"""The prefix cache's bookkeeping on real tensors: the longest shared prefix per adapter and attach id, at least
`min_match` tokens and never a whole prompt, least recently used out by tokens, and an unloaded adapter forgotten."""

from __future__ import annotations

import torch

from selfalign.runtime.prefix import PrefixCache


def layers(ids: list[int], n_layers: int = 2) -> list:
    """Keys and values that record their token: position t of every layer holds ids[t]."""
    kv = torch.tensor(ids, dtype=torch.float32).view(1, 1, len(ids), 1).expand(1, 2, len(ids), 3).clone()
    return [(kv, kv + 0.5) for _ in range(n_layers)]


def test_find_returns_the_longest_shared_prefix_on_the_same_adapter_and_attach_id():
    cache = PrefixCache(max_tokens=100, min_match=3)
    cache.add(("a", 1), [1, 2, 3, 4, 5, 6], layers([1, 2, 3, 4, 5, 6]))
    cache.add(("a", 1), [1, 2, 3, 9, 9], layers([1, 2, 3, 9, 9]))
    cache.add(("b", 2), [1, 2, 3, 4, 5, 6, 7], layers([1, 2, 3, 4, 5, 6, 7]))
    skip, kv = cache.find(("a", 1), [1, 2, 3, 4, 5, 8])
    assert skip == 5 and [t.shape for t in kv[0]] == [torch.Size([1, 2, 5, 3])] * 2
    assert kv[1][0][0, 0, :, 0].tolist() == [1, 2, 3, 4, 5] and kv[1][1][0, 0, 0, 0].item() == 1.5
    assert cache.find(("a", 1), [1, 2, 3, 4, 5, 6])[0] == 5  # a repeat still prefills its last token
    assert cache.find(("a", 2), [1, 2, 3, 4, 5, 6]) == (0, None)  # the adapter was replaced: another attach id
    assert cache.find(("b", 2), [1, 2, 7]) == (0, None)  # below min_match
    assert cache.find((None, None), [1, 2, 3, 4]) == (0, None)  # the base has no entry


def test_least_recently_used_entries_leave_first_and_unload_forgets_an_adapter():
    cache = PrefixCache(max_tokens=10, min_match=2)
    cache.add(("a", 1), [1, 2, 3, 4], layers([1, 2, 3, 4]))
    cache.add(("b", 1), [5, 6, 7, 8], layers([5, 6, 7, 8]))
    assert cache.find(("a", 1), [1, 2, 3, 0])[0] == 3  # "a" is now the most recently used
    cache.add(("a", 1), [1, 2, 9], layers([1, 2, 9]))  # 11 tokens: the least recently used ("b") goes
    assert cache.tokens == 7 and cache.find(("b", 1), [5, 6, 7, 0]) == (0, None)
    cache.add(("a", 1), list(range(11)), layers(list(range(11))))  # longer than the whole cache: not kept
    assert cache.tokens == 7
    cache.drop("a")
    assert cache.tokens == 0 and not cache.entries
