"""The prefix cache's blocks: keys, save and load against a batch's store, LRU eviction, the byte bound."""

from __future__ import annotations

import pytest
import torch

from models import prefix_cache
from models.kv_cache import CacheShape, KVStore
from models.prefix_cache import PrefixCache, block_hashes, chain_root

SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
BLOCK = 4
ROOT = chain_root("test-model", "float32")


def cache(blocks: int) -> PrefixCache:
    block_bytes = 2 * SHAPE.num_layers * SHAPE.kv_heads * BLOCK * SHAPE.head_dim * 4
    return PrefixCache(SHAPE, blocks * block_bytes, ROOT, block_tokens=BLOCK)


def store_with(tokens: list[int], row: int = 0, column: int = 0) -> KVStore:
    """A store whose `row` holds, from `column` on, a distinct value per (layer, head, token, dim)."""
    store = KVStore(SHAPE, rows=2, cols=32)
    for layer in range(SHAPE.num_layers):
        values = torch.tensor(tokens, dtype=torch.float32)[None, :, None] * 100 + layer * 10
        values = values + torch.arange(SHAPE.kv_heads)[:, None, None] + torch.arange(SHAPE.head_dim) / 10
        store.keys[layer][row, :, column : column + len(tokens)] = values
        store.values[layer][row, :, column : column + len(tokens)] = -values
    return store


def test_keys_chain_over_blocks_and_depend_on_model_and_dtype() -> None:
    tokens = list(range(10))
    keys = block_hashes(ROOT, tokens, BLOCK)
    assert len(keys) == 2, "a trailing partial block has no key"
    assert block_hashes(ROOT, tokens[:8] + [99], BLOCK) == keys
    assert block_hashes(ROOT, [7, *tokens[1:]], BLOCK)[1] != keys[1], "block 2's key covers block 1's tokens"
    assert block_hashes(chain_root("test-model", "bfloat16"), tokens, BLOCK)[0] != keys[0]
    assert block_hashes(chain_root("other-model", "float32"), tokens, BLOCK)[0] != keys[0]


def test_saved_blocks_load_into_another_row_at_another_column() -> None:
    tokens = list(range(1, 11))
    source = store_with(tokens, row=1, column=5)
    prefix = cache(blocks=8)
    keys = prefix.keys_of(tokens)
    assert prefix.save(source, row=1, column=5, keys=keys) == 2
    assert prefix.match(keys) == 2 and prefix.match(prefix.keys_of([1, 2, 3, 4, 0, 0, 0, 0])) == 1
    target = KVStore(SHAPE, rows=2, cols=32)
    prefix.load(target, row=0, column=20, keys=keys, tokens=6)  # a block and a half
    for layer in range(SHAPE.num_layers):
        for buffers, theirs in ((target.keys, source.keys), (target.values, source.values)):
            assert torch.equal(buffers[layer][0, :, 20:26], theirs[layer][1, :, 5:11])
            assert buffers[layer][0, :, 26:].isnan().all(), "nothing past the tokens asked for is written (still NaN)"
    assert prefix.save(source, row=1, column=5, keys=keys) == 0, "cached blocks are not copied again"


def test_the_least_recently_used_blocks_go_first_and_a_chain_loses_its_tail_first() -> None:
    prefix = cache(blocks=3)
    a = list(range(100, 108))  # two blocks
    b = list(range(200, 204))  # one block
    prefix.save(store_with(a), 0, 0, prefix.keys_of(a))
    prefix.save(store_with(b), 0, 0, prefix.keys_of(b))
    assert len(prefix) == 3 and prefix.bytes_used == 3 * prefix.block_bytes
    c = list(range(300, 304))
    prefix.save(store_with(c), 0, 0, prefix.keys_of(c))  # full: the oldest chain's last block goes
    assert prefix.evictions == 1 and len(prefix) == 3
    assert prefix.match(prefix.keys_of(a)) == 1 and prefix.match(prefix.keys_of(b)) == 1
    prefix.match(prefix.keys_of(a))  # a lookup does not refresh; a load does
    prefix.load(KVStore(SHAPE, rows=1, cols=8), 0, 0, prefix.keys_of(a)[:1], tokens=4)
    d = list(range(400, 404))
    prefix.save(store_with(d), 0, 0, prefix.keys_of(d))
    assert prefix.match(prefix.keys_of(b)) == 0, "b was the least recently used"
    assert prefix.match(prefix.keys_of(a)) == 1 and prefix.match(prefix.keys_of(d)) == 1


def test_the_byte_bound_holds_and_what_does_not_fit_is_not_cached() -> None:
    prefix = cache(blocks=2)
    tokens = list(range(1, 17))  # four blocks, more than the whole cache
    prefix.save(store_with(tokens), 0, 0, prefix.keys_of(tokens))
    assert len(prefix) == 2 and prefix.bytes_used <= prefix.capacity * prefix.block_bytes
    assert prefix.match(prefix.keys_of(tokens)) == 2, "a chain keeps its first blocks, not a middle"
    assert cache(blocks=0).capacity == 0


@pytest.mark.parametrize(("free_gib", "expected_gib"), [(8, 0.8), (256, 4)])
def test_the_default_bound_is_a_share_of_free_memory_up_to_4_gib(
    free_gib: float, expected_gib: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10% of a small machine; on a large one no more than 4 GiB (10% of 256 GiB would be 25 GiB)."""
    page = 4096
    pages = int(free_gib * 2**30) // page
    monkeypatch.setattr(prefix_cache.os, "sysconf", {"SC_AVPHYS_PAGES": pages, "SC_PAGE_SIZE": page}.__getitem__)
    assert prefix_cache.default_bytes(torch.device("cpu")) == pytest.approx(expected_gib * 2**30, rel=1e-6)
