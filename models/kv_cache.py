"""KV storage for a batch of left-padded rows: the only code that reaches into transformers' cache.

Each layer keeps its keys and values in one preallocated buffer of shape
`[row_capacity, kv_heads, col_capacity, head_dim]`. The batch (models/batch.py) decides which window
of it is live; this module allocates, moves rows, clears regions and hands the model a transformers
`Cache` over one window. A decode step writes its one new column in place, so nothing already cached
is copied or recomputed, and a row that leaves is replaced by moving one other row into its slot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from models.attention import Part, Parts, Span, unflatten


def check_supported(config: PretrainedConfig) -> None:
    """Refuse models whose cache is not a plain full-attention KV cache (sliding windows, recurrent state).

    Raises ValueError naming what was found.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported")
    layers = DynamicCache(config=config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"unsupported cache layers {', '.join(odd)}: only full-attention models are served")


@dataclass(frozen=True)
class CacheShape:
    """What one cached token looks like in every layer."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> CacheShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(model.parameters())
        return cls(
            num_layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            dtype=param.dtype,
            device=param.device,
        )


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


_MALLOC_TRIM = _malloc_trim()  # glibc's; None on other C libraries


def return_freed_memory() -> None:
    """Hand the memory dropped stores leave in the C heap back to the system.

    A store's layers are megabytes each, yet glibc serves an allocation of that size from its heap once an
    earlier one was freed (its mmap threshold rises with every such free, up to 32 MiB) and keeps what is freed
    there: the process would stay as large as the widest store the batch ever needed. Measured with the soak's
    mix: 1.5 GiB more resident after the load than before it, all of it returned by malloc_trim.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Bytes of dropped stores the heap may hold before they are handed back: malloc_trim walks the whole heap, 3 ms
# (median) to 17 ms a call at 32 int4 streams on a 2-core AVX-512 EPYC; called at every newcomer's join, it took
# 2% of the run, stalling each such step.
TRIM_BYTES = 256 << 20
_held = 0  # bytes of stores dropped since the last trim (the engine's step thread alone drops stores)


def release(freed: int, idle: bool = False) -> None:
    """A store of `freed` bytes was dropped (its last reference gone): return the heap's freed memory once the
    stores dropped since the last time add up to TRIM_BYTES, or at once when the batch is left empty (`idle`)."""
    global _held
    _held += freed
    if idle or _held >= TRIM_BYTES:
        _held = 0
        return_freed_memory()


def allocate(size: tuple[int, ...], shape: CacheShape) -> torch.Tensor:
    """One layer's keys or values, uninitialised.

    torch.empty, not zeros: a store is sized for rows and columns it may never use (row capacity doubles,
    columns keep headroom for decode growth), and zeroing it all would write every page of it, which at a
    long prompt's join is seconds of memory traffic for nothing. Untouched pages cost no memory either.
    """
    return torch.empty(size, dtype=shape.dtype, device=shape.device)


class KVStore:
    """Keys and values of every layer, each `[rows, kv_heads, cols, head_dim]`, garbage where never written.

    NOTE: the batch writes or clears (to zero) every column before it enters the live window, and nothing
    reads outside that window. This matters: a masked key still enters SDPA's product with weight 0, and
    0 * NaN is NaN, so a live column holding garbage could poison every row. Tests fill new stores with NaN
    (tests/conftest.py) so that any column read unwritten shows.
    """

    def __init__(self, shape: CacheShape, rows: int, cols: int) -> None:
        self.shape = shape
        self.rows = rows
        self.cols = cols
        size = (rows, shape.kv_heads, cols, shape.head_dim)
        self.keys = [allocate(size, shape) for _ in range(shape.num_layers)]
        self.values = [allocate(size, shape) for _ in range(shape.num_layers)]
        self.bytes = 2 * sum(t.numel() * t.element_size() for t in self.keys)  # allocated: keys and values, every layer

    def window(self, rows: slice, start: int, write_at: int) -> Cache:
        """A transformers Cache over `rows`: new states land at column `write_at`, attention reads `[start, write_at + q)`."""
        layers = [WindowLayer(k, v, rows, start, write_at) for k, v in zip(self.keys, self.values)]
        return Cache(layers=layers)

    def move_rows(self, src: list[int], dst: list[int], cols: slice) -> None:
        """Copy rows `src` onto rows `dst` within `cols`; the two lists must not overlap."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[dst, :, cols] = buf[src, :, cols]

    def gather_rows(self, src: list[int], dst: list[int], cols: slice) -> None:
        """Row dst[i] becomes a copy of row src[i] within `cols`; a source may repeat and may also be a destination.

        NOTE: indexing with a list gathers every source row into a new tensor before any destination is written,
        so no copy reads a row that another copy of the same call has already overwritten.
        """
        index = torch.tensor(src, device=self.shape.device)
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[dst, :, cols] = buf[index, :, cols]  # the right side is a gathered copy

    def clear(self, rows: slice, cols: slice, layers: range | None = None) -> None:
        for buffers in (self.keys, self.values):
            for i in range(self.shape.num_layers) if layers is None else layers:
                buffers[i][rows, :, cols] = 0

    def copy_rows_to(self, other: KVStore, rows: int, src_cols: slice, dst_rows: slice, dst_start: int) -> None:
        """Copy this store's first `rows` rows, columns `src_cols`, into rows `dst_rows` of `other` at column
        `dst_start`; this store is left as it was."""
        dst_cols = slice(dst_start, dst_start + src_cols.stop - src_cols.start)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for src, dst in zip(mine, theirs):
                dst[dst_rows, :, dst_cols] = src[:rows, :, src_cols]

    def copy_to(self, other: KVStore, rows: int, src_cols: slice, dst_start: int) -> None:
        """Copy the first `rows` rows, columns `src_cols`, into `other` at column `dst_start`.

        Releases each of this store's layers once copied, so a resize holds at most one extra layer
        at its peak instead of a second full cache.
        """
        width = src_cols.stop - src_cols.start
        dst_cols = slice(dst_start, dst_start + width)
        for i in range(self.shape.num_layers):
            other.keys[i][:rows, :, dst_cols] = self.keys[i][:rows, :, src_cols]
            other.values[i][:rows, :, dst_cols] = self.values[i][:rows, :, src_cols]
            self.keys[i] = self.values[i] = _RELEASED
        self.rows = self.cols = 0


_RELEASED = torch.empty(0)


class _StoreLayer(CacheLayerMixin):
    """A transformers cache layer over storage KVStore has already allocated."""

    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is preallocated by KVStore; nothing to do."""


class WindowLayer(_StoreLayer):
    """One layer of a window: writes in place and returns views, never concatenates."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: slice, start: int, write_at: int) -> None:
        super().__init__()
        self._key_buffer = keys
        self._value_buffer = values
        self._rows = rows
        self._start = start
        self._write_at = write_at

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [rows, kv_heads, q, head_dim]
        stop = self._write_at + key_states.shape[-2]
        self._key_buffer[self._rows, :, self._write_at : stop] = key_states
        self._value_buffer[self._rows, :, self._write_at : stop] = value_states
        self._write_at = stop
        self.keys = self._key_buffer[self._rows, :, self._start : stop]
        self.values = self._value_buffer[self._rows, :, self._start : stop]
        return self.keys, self.values

    def claim(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """For a kernel that writes the new states itself (models/native.cpp's `decoder_layer`): the store's key
        and value buffers, the window's first row, its first column and the column where `tokens` new states
        land. The window then counts them as written, as `update` would."""
        write_at = self._write_at
        self._write_at += tokens
        return self._key_buffer, self._value_buffer, self._rows.start, self._start, write_at

    def get_seq_length(self) -> int:
        return self._write_at - self._start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self._key_buffer.shape[-2] - self._start


def flat_cache(windows: list[Cache], spans: list[Span]) -> Cache:
    """One Cache over several windows (of one store or several) for a forward whose tokens are flattened into
    one sequence: window i takes the keys and values of span i's tokens (models/attention.py)."""
    layers = [_FlatLayer([window.layers[i] for window in windows], spans) for i in range(len(windows[0].layers))]
    return Cache(layers=layers)


class _FlatLayer(_StoreLayer):
    """One layer of a flattened forward: each span's new states go to its own window, and the attention gets
    every window's keys and values, with the span's mask, as `Parts`."""

    def __init__(self, windows: list[CacheLayerMixin], spans: list[Span]) -> None:
        super().__init__()
        self._windows = windows
        self._spans = spans

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[Parts, Parts]:
        # key_states, value_states: [1, kv_heads, tokens, head_dim], the spans' tokens one after another
        parts = []
        for window, span in zip(self._windows, self._spans, strict=True):
            keys, values = window.update(unflatten(key_states, span), unflatten(value_states, span))
            parts.append(Part(span, keys, values))
        return Parts(tuple(parts)), Parts(tuple(parts))

    def get_seq_length(self) -> int:
        return 0  # positions come with the forward; a flattened sequence has no single length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only asked when transformers builds a mask itself, which `flatten`'s 4-D attention_mask prevents:
        # one mask over the flattened tokens would let every part attend to the others.
        raise RuntimeError("a flattened forward needs its parts' own masks: pass the 4-D mask `flatten` makes")

    def get_max_length(self) -> int:
        return -1  # no single length either
