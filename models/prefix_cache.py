"""Cached KV of token prefixes, in fixed-size blocks, so a prompt that starts like an earlier one skips that part.

A block holds the keys and values of `block_tokens` consecutive tokens in every layer. Blocks are keyed by a
hash chain: block i's key hashes block i-1's key and block i's token ids, and the chain's root hashes the
model's name and dtype, so one key names one whole prefix on one model in one dtype, the only things its
KV depends on. Keys are 128-bit BLAKE2b digests held as plain ints: the scheduler decides hits from them
without touching a tensor, and a collision (another prompt's KV served to a request) is not a practical risk.

The store is one preallocated pool per layer, `[slots, kv_heads, block_tokens, head_dim]`, bounded in
bytes; when it is full the least recently used block is evicted. A hit touches the chain from its last
block to its first, so a prefix's first blocks are always fresher than its last ones and eviction takes
the leaves first: a chain never loses a block in its middle while its tail is kept.

Saving and loading copy columns of one row of the running batch's store (models/kv_cache.py) to and from
the pool; the batch decides where the row's columns are.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from models.kv_cache import CacheShape, KVStore

BLOCK_TOKENS = 16
# With no size given, the cache may use this share of the memory that is free when it is created, up to
# DEFAULT_MAX_BYTES: a share alone grows with the machine, not with the model (10% of 256 GiB is 25 GiB for
# a 135M model), while 4 GiB, vLLM's CPU KV space by default, holds about 90,000 tokens of SmolLM2-135M's
# float32 KV (46 KB a token): dozens of long system prompts and conversations.
DEFAULT_FREE_SHARE = 0.10
DEFAULT_MAX_BYTES = 4 << 30


def chain_root(model_name: str, dtype: str) -> int:
    """The hash every chain starts from: KV depends on the model and its dtype, and on nothing else but tokens."""
    return int.from_bytes(hashlib.blake2b(f"{model_name}\0{dtype}".encode(), digest_size=16).digest(), "big")


def block_hashes(root: int, token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """The key of every full block of `token_ids`, in order; a trailing partial block has none."""
    keys: list[int] = []
    parent = root.to_bytes(16, "big")
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", token_ids[start : start + block_tokens]).tobytes())
        parent = digest.digest()
        keys.append(int.from_bytes(parent, "big"))
    return keys


def default_bytes(device: torch.device) -> int:
    """DEFAULT_FREE_SHARE of the memory free now on `device` (host memory for the CPU), at most DEFAULT_MAX_BYTES."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(int(free * DEFAULT_FREE_SHARE), DEFAULT_MAX_BYTES)


class PrefixCache:
    """Blocks of cached KV keyed by hash chains, least recently used evicted first, at most `max_bytes`."""

    def __init__(self, shape: CacheShape, max_bytes: int, root: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.shape = shape
        self.root = root  # chain_root(model, dtype)
        self.block_tokens = block_tokens
        itemsize = torch.empty(0, dtype=shape.dtype).element_size()
        self.block_bytes = 2 * shape.num_layers * shape.kv_heads * block_tokens * shape.head_dim * itemsize
        self.capacity = max_bytes // self.block_bytes  # blocks
        size = (self.capacity, shape.kv_heads, block_tokens, shape.head_dim)
        # torch.empty: pages are only committed as blocks are written, so an idle cache costs no memory.
        self._keys = [torch.empty(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.num_layers)]
        self._values = [torch.empty(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.num_layers)]
        self._slots: OrderedDict[int, int] = OrderedDict()  # block key -> pool slot, least recently used first
        self._free = list(range(self.capacity - 1, -1, -1))
        self.evictions = 0

    @property
    def bytes_used(self) -> int:
        return len(self._slots) * self.block_bytes

    def __len__(self) -> int:
        return len(self._slots)

    def keys_of(self, token_ids: Sequence[int]) -> list[int]:
        """The chain of keys of the full blocks of `token_ids`; a pure function, safe from any thread."""
        return block_hashes(self.root, token_ids, self.block_tokens)

    def match(self, keys: Sequence[int]) -> int:
        """How many leading blocks of `keys` are cached."""
        count = 0
        for key in keys:
            if key not in self._slots:
                break
            count += 1
        return count

    def load(self, store: KVStore, row: int, column: int, keys: Sequence[int], tokens: int) -> None:
        """Write the first `tokens` cached tokens of chain `keys` into `row` of `store` from `column` on.

        The blocks must be cached (`match`); a last block may be used in part.
        """
        blocks = -(-tokens // self.block_tokens)
        slots = torch.tensor([self._slots[key] for key in keys[:blocks]], device=self.shape.device)
        self._touch(keys[:blocks])
        for pool, buffers in ((self._keys, store.keys), (self._values, store.values)):
            for layer, buf in enumerate(buffers):
                cached = pool[layer][slots]  # [blocks, kv_heads, block_tokens, head_dim]
                flat = cached.transpose(0, 1).reshape(self.shape.kv_heads, blocks * self.block_tokens, -1)
                buf[row, :, column : column + tokens] = flat[:, :tokens]

    def save(self, store: KVStore, row: int, column: int, keys: Sequence[int]) -> int:
        """Cache the blocks of chain `keys` whose tokens sit in `row` of `store` from `column` on; returns how
        many were new. Blocks already cached are only touched; when the pool is full, the least recently
        used blocks not in this chain make room, and what still does not fit is not cached."""
        missing = [i for i, key in enumerate(keys) if key not in self._slots]
        protected = set(keys)
        placed: list[tuple[int, int]] = []  # (block index in the chain, slot)
        for i in missing:
            slot = self._take_slot(protected)
            if slot is None:
                break
            placed.append((i, slot))
        if not placed:
            self._touch([key for key in keys if key in self._slots])
            return 0
        index = torch.tensor([i for i, _ in placed], device=self.shape.device)
        slots = torch.tensor([s for _, s in placed], device=self.shape.device)
        width = len(keys) * self.block_tokens
        for pool, buffers in ((self._keys, store.keys), (self._values, store.values)):
            for layer, buf in enumerate(buffers):
                # [kv_heads, blocks, block_tokens, head_dim] -> the new blocks, slot-major as the pool is
                blocks = buf[row, :, column : column + width].unflatten(1, (len(keys), self.block_tokens))
                pool[layer][slots] = blocks[:, index].transpose(0, 1)
        for i, slot in placed:
            self._slots[keys[i]] = slot
        self._touch([key for key in keys if key in self._slots])
        return len(placed)

    def _touch(self, keys: Sequence[int]) -> None:
        """Mark blocks used now, a chain's first block freshest (see the module's docstring)."""
        for key in reversed(keys):
            self._slots.move_to_end(key)

    def _take_slot(self, protected: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key in self._slots:  # least recently used first
            if key not in protected:
                self.evictions += 1
                return self._slots.pop(key)
        return None


def for_model(model: torch.nn.Module, name: str, dtype: str, max_bytes: int | None) -> PrefixCache | None:
    """The prefix cache for a loaded model, bounded by `max_bytes` (None: `default_bytes` of its device);
    None when the bound holds not even one block."""
    shape = CacheShape.of(model)
    max_bytes = default_bytes(shape.device) if max_bytes is None else max_bytes
    cache = PrefixCache(shape, max_bytes, chain_root(name, dtype))
    return cache if cache.capacity else None
