"""Rows of left-padded sequences sharing one KV store: build, step, filter and join.

NOTE: the one invariant everything here keeps: row r's real tokens occupy exactly the KV columns
`[end - lengths[r], end)`, so every row's last token sits in column `end - 1` (left padding), and
the live window is `[start, end)` with `start = end - max(lengths)`. The attention mask and the
position ids are derived from `lengths` alone, so they cannot drift from the cache:
- mask: column c of row r is real iff `c >= end - lengths[r]`; a pad is never attended to;
- position of a row's next token: `lengths[r]`, its count of real tokens, whatever its padding.
Dropping rows never touches the survivors' columns; the left columns that are padding in every
remaining row fall out of the window by themselves, since `start` follows `max(lengths)`.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from models.forward import Forward
from models.kv_cache import CacheShape, KVStore, release

Key = TypeVar("Key", bound=Hashable)

# Written into padded input positions; any valid index works since pads are masked, but it must be a
# valid index (a negative id fails the embedding lookup on some devices).
PAD_ID = 0
# Columns reserved to the right of the window when storage is reallocated: amortises decode growth so a
# reallocation (a full copy) happens once per max(MIN_HEADROOM, width / 2) steps, not every step.
MIN_HEADROOM = 64


@dataclass
class _Zeroed:
    """Columns `[left, right)` of rows `[0, rows)` of the batch's store hold zeros in layers `[0, layers)`: what
    `make_room` cleared, less what has been written since, so that the join after it need not clear it again.
    Forgotten whenever the store is replaced."""

    rows: int
    left: int
    right: int
    layers: int


class Batch(Generic[Key]):
    """The running rows, each owned by a key (the engine's row, server/row.py), in row order."""

    def __init__(self, shape: CacheShape, max_rows: int) -> None:
        self.shape = shape
        self.max_rows = max_rows
        self.keys: list[Key] = []
        self.lengths: list[int] = []  # real tokens cached per row
        self.end = 0  # column where the next decode step writes
        self._store: KVStore | None = None
        self._zeroed: _Zeroed | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def width(self) -> int:
        """Padded length of the live window: the longest row."""
        return max(self.lengths, default=0)

    @property
    def start(self) -> int:
        return self.end - self.width

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) of the allocated storage."""
        return (self._store.rows, self._store.cols) if self._store else (0, 0)

    def attention_mask(self) -> torch.Tensor:
        """[rows, width] bool: True on real tokens of the live window."""
        return self._mask(self.start, self.end)

    @property
    def store(self) -> KVStore | None:
        """The storage the rows live in (None while the batch is empty)."""
        return self._store

    def first_column(self, row: int) -> int:
        """The store column of row `row`'s first real token."""
        return self.end - self.lengths[row]

    def prefill(
        self,
        keys: Sequence[Key],
        prompts: Sequence[Sequence[int]],
        reused: Sequence[int] | None = None,
        room: int = 0,
    ) -> Forward:
        """Append one row per prompt and return the inputs that prefill them as one left-padded group.

        The group is written straight into its rows of the shared store, right-aligned at `end`, so
        joining the running batch copies nothing: the side with the shorter past is padded on the
        left by widening the window. `reused[i]` leading tokens of prompt i are not computed: the caller
        writes their KV (from the prefix cache) into columns `[first_column(row), end - computed)` before
        running the forward, which computes the last `q = max(len(p) - reused)` columns of the group.

        NOTE: every row computes exactly its last min(len(p), q) tokens, so a row that reuses KV has no
        padding inside the computed columns: a pad written there would overwrite its reused tokens. Hence
        `reused[i]` must be 0 or `len(p) - q`, and at most `len(p) - 1` (the last token yields the logits).
        `room`: columns to keep free right of the group, for `extend`s to come (the rest of a chunked prompt).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt, each of at least one token")
        n, k = len(self), len(prompts)
        lengths = [len(p) for p in prompts]
        reused = list(reused) if reused is not None else [0] * k
        q = max(length - r for length, r in zip(lengths, reused, strict=True))
        for length, r in zip(lengths, reused):
            if r and (r != length - q or r >= length):
                raise ValueError(f"a row reusing {r} of {length} tokens must compute the group's {q} columns")
        group = max(lengths)  # the group's window; its forward computes the last q columns
        width = max(self.width, group)
        self._reserve(rows=n + k, width=width, right=room)
        start = self.end - width
        # Columns that enter the window unwritten must hold zeros (see KVStore): the old rows' new left
        # columns, and the new rows' columns left of their computed ones (reused columns are then loaded).
        self._store.clear(slice(0, n), slice(start, self.start))
        self._store.clear(slice(n, n + k), slice(start, self.end - q))

        device = self.shape.device
        input_ids = torch.tensor([[PAD_ID] * (q - len(p)) + list(p[-q:]) for p in prompts], device=device)
        lengths_t = torch.tensor(lengths, device=device)[:, None]  # [k, 1]
        query = torch.arange(q, device=device)[None, :]  # [1, q]
        real = query >= q - lengths_t  # [k, q]
        # Pads get position 0, a valid index; real tokens count from 0 at the row's first real token.
        position_ids = (query + lengths_t - q).clamp(min=0)  # [k, q]
        keys_at = torch.arange(group, device=device)  # key columns of the group's window
        query_at = group - q + torch.arange(q, device=device)  # [q] their columns in that window
        causal = keys_at[None, :] <= query_at[:, None]  # [q, group]
        real_key = keys_at[None, :] >= group - lengths_t  # [k, group]
        # A pad query attends to itself only: a fully masked query row can come out of SDPA as NaN,
        # which would spread through the pad's keys into real rows. Real queries never see a pad key.
        diagonal = keys_at[None, :] == query_at[:, None]  # [q, group]
        mask = (causal[None] & real_key[:, None, :]) | (diagonal[None] & ~real[:, :, None])  # [k, q, group]
        cache = self._store.window(slice(n, n + k), start=self.end - group, write_at=self.end - q)

        self.keys.extend(keys)
        self.lengths.extend(lengths)
        return Forward(input_ids, position_ids, mask[:, None], cache, real_tokens=sum(lengths) - sum(reused))

    def decode(self, tokens: Sequence[int]) -> Forward:
        """Feed one token per row (its last sampled token) at column `end`; return the step's inputs."""
        return self.extend([[token] for token in tokens])

    def extend(self, tokens: Sequence[Sequence[int]]) -> Forward:
        """Feed q tokens per row, the same q for every row, at columns `[end, end + q)`: a decode step when q
        is 1; a speculative draft's verification, or a later chunk of a prompt prefilled in chunks (in its own
        staging batch), when more. Left padding holds because every row grows alike."""
        if len(tokens) != len(self):
            raise ValueError(f"need tokens for every row: {len(tokens)} lists for {len(self)} rows")
        q = len(tokens[0]) if tokens else 0
        if q == 0 or any(len(t) != q for t in tokens):
            raise ValueError("every row needs the same number of tokens, at least one")
        self._reserve(rows=len(self), width=self.width, right=q)
        device = self.shape.device
        input_ids = torch.tensor(tokens, device=device)  # [rows, q]
        steps = torch.arange(q, device=device)
        position_ids = torch.tensor(self.lengths, device=device)[:, None] + steps[None, :]  # [rows, q]
        real = self._mask(self.start, self.end + q)  # [rows, width + q]
        # New token j sees the cache and new tokens 0..j: column end + i for i <= j.
        columns = torch.arange(self.start, self.end + q, device=device)
        causal = columns[None, :] <= self.end + steps[:, None]  # [q, width + q]
        mask = real[:, None, :] & causal[None]  # [rows, q, width + q]
        cache = self._store.window(slice(0, len(self)), start=self.start, write_at=self.end)
        self.lengths = [length + q for length in self.lengths]
        self.end += q
        return Forward(input_ids, position_ids, mask[:, None], cache, real_tokens=q * len(tokens))

    def rewind(self, columns: int) -> None:
        """Forget the last `columns` tokens of every row (a draft's rejected tail).

        NOTE: the forgotten columns keep stale keys and values right of `end`; nothing reads a column right
        of `end` before a step writes it, so they need no clearing.
        """
        if columns < 0 or columns >= min(self.lengths, default=0):
            raise ValueError(f"cannot rewind {columns} columns of rows of lengths {self.lengths}")
        self.lengths = [length - columns for length in self.lengths]
        self.end -= columns

    def join(self, other: Batch[Key]) -> None:
        """Move every row of `other` (a batch with its own store, such as a prompt prefilled in chunks) into
        this one, right-aligned at `end` like a prefill group; `other` is left empty."""
        if not len(other):
            return
        n, k = len(self), len(other)
        width = max(self.width, other.width)
        self._reserve(rows=n + k, width=width, right=0)
        start = self.end - width
        # NOTE: rows [0, n) need zeros in [start, self.start), their new left padding; make_room has usually
        # written them already, and only what it has not (or what was written since) is cleared here.
        zeroed, self._zeroed = self._zeroed, None
        if zeroed is None or zeroed.rows < n or zeroed.layers < self.shape.num_layers:
            self._store.clear(slice(0, n), slice(start, self.start))
        else:
            self._store.clear(slice(0, n), slice(start, min(self.start, zeroed.left)))
            self._store.clear(slice(0, n), slice(max(start, zeroed.right), self.start))
        self._store.clear(slice(n, n + k), slice(start, self.end - other.width))
        other._store.copy_rows_to(
            self._store, k, slice(other.start, other.end), dst_rows=slice(n, n + k), dst_start=self.end - other.width
        )
        self.keys.extend(other.keys)
        self.lengths.extend(other.lengths)
        freed = other._store.bytes if other._store is not None else 0
        other.keys, other.lengths, other.end, other._store = [], [], 0, None
        release(freed)

    def make_room(self, rows: int, width: int, layers: range) -> None:
        """Ready the store, a share of its layers at a time, for a later `join` that brings the batch to `rows`
        rows and a window `width` wide (a prompt prefilled in chunks).

        The join writes zeros into every running row's columns that become its left padding. On memory never
        touched before, those writes are page faults: a second or more for a long prompt joining a busy batch,
        which every stream would feel as one stalled token. Written here ahead of time for `layers` (they are
        outside the live window, so nothing reads them), they need no clearing at the join unless written since
        (a filter moving rows), and rows appended since are cleared there. The store is reallocated at the first
        call if it must be (a copy of the live window only).
        """
        if not len(self):
            return
        width = max(width, self.width)  # a newcomer shorter than the running rows is padded, not them
        self._reserve(rows=rows, width=width, right=0)
        left = self.end - width
        self._store.clear(slice(0, len(self)), slice(left, self.start), layers)
        zeroed = self._zeroed
        if layers.start == 0:
            self._zeroed = _Zeroed(len(self), left, self.start, layers.stop)
        elif zeroed is not None and zeroed.layers == layers.start:
            zeroed.rows, zeroed.layers = min(zeroed.rows, len(self)), layers.stop
            zeroed.left, zeroed.right = max(zeroed.left, left), min(zeroed.right, self.start)
        else:  # shares out of order: claim nothing
            self._zeroed = None

    def filter(self, leaving: Collection[Key]) -> None:
        """Drop the rows owned by `leaving`; survivors keep their cache, possibly in another row."""
        dropped = {i for i, key in enumerate(self.keys) if key in leaving}
        if not dropped:
            return
        kept = len(self) - len(dropped)
        if kept == 0:
            freed = self._store.bytes if self._store is not None else 0
            self.keys, self.lengths, self.end, self._store, self._zeroed = [], [], 0, None, None
            release(freed, idle=True)
            return
        # NOTE: rows [0, kept) will be the survivors. Dropped rows below `kept` are holes and kept rows at
        # or above `kept` are movers; there are exactly as many of each, so moving each mover into a hole
        # copies only those rows, not everything after the first hole.
        holes = sorted(i for i in dropped if i < kept)
        movers = [i for i in range(kept, len(self)) if i not in dropped]
        for hole, mover in zip(holes, movers, strict=True):
            self.keys[hole], self.lengths[hole] = self.keys[mover], self.lengths[mover]
        del self.keys[kept:], self.lengths[kept:]
        if movers:
            self._store.move_rows(movers, holes, slice(self.start, self.end))
            self._written(self.start)
        if self._zeroed is not None:  # rows appended later take the indices from `kept` on
            self._zeroed.rows = min(self._zeroed.rows, kept)

    def adopt(self, children: Sequence[Key], parents: Sequence[Key]) -> None:
        """Row `children[i]` becomes a copy of row `parents[i]`, cache and length (beam search forks and reorders).

        Children not in the batch yet are appended first. A parent may have several children and may be a
        child itself: the copy gathers every parent before it writes any child (KVStore.gather_rows). Rows
        keep their left padding, since a child takes its parent's length with its cache.
        """
        if len(children) != len(parents):
            raise ValueError(f"adopt needs one parent per child: {len(parents)} parents for {len(children)} children")
        row_of = {key: i for i, key in enumerate(self.keys)}
        src = [row_of[parent] for parent in parents]
        lengths = [self.lengths[i] for i in src]
        new = [child for child in dict.fromkeys(children) if child not in row_of]
        if new:
            self._reserve(rows=len(self) + len(new), width=self.width, right=0)
            for child in new:
                row_of[child] = len(self.keys)
                self.keys.append(child)
                self.lengths.append(0)
        dst = [row_of[child] for child in children]
        moves = [(s, d) for s, d in zip(src, dst, strict=True) if s != d]
        for d, length in zip(dst, lengths, strict=True):
            self.lengths[d] = length
        if moves:
            self._store.gather_rows([s for s, _ in moves], [d for _, d in moves], slice(self.start, self.end))
            self._written(self.start)

    def _written(self, column: int) -> None:
        """Running rows were written from `column` on (not only at `end`): those columns are zeros no more."""
        if self._zeroed is not None:
            self._zeroed.right = min(self._zeroed.right, column)

    def _mask(self, start: int, stop: int) -> torch.Tensor:
        device = self.shape.device
        columns = torch.arange(start, stop, device=device)
        first_real = self.end - torch.tensor(self.lengths, device=device)
        return columns[None, :] >= first_real[:, None]  # [rows, stop - start]

    def _reserve(self, rows: int, width: int, right: int) -> None:
        """Ensure storage for `rows` rows, a window `width` wide ending at `end`, and `right` more columns."""
        store = self._store
        if store is not None and rows <= store.rows and width <= self.end and self.end + right <= store.cols:
            return
        row_capacity = rows if store is None else max(rows, min(self.max_rows, 2 * store.rows))
        end = width
        new = KVStore(self.shape, row_capacity, end + max(right, MIN_HEADROOM, end // 2))
        if store is not None and len(self):
            store.copy_to(new, len(self), slice(self.start, self.end), dst_start=end - self.width)
        self._store, self.end, self._zeroed = new, end, None
        if store is not None:
            freed = store.bytes
            del store  # the last reference to the old store: free it, then count it
            release(freed)
