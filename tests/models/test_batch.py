"""Attention masks, position ids and cache contents of a batch, against hand-computed expectations.

No model runs here: each forward is played by writing the input ids themselves as keys and values,
exactly as a model's attention layers would write theirs, so the cache's contents can be read back.
"""

from __future__ import annotations

import pytest
import torch

from models.attention import Parts
from models.batch import Batch
from models.forward import Forward, flatten
from models import kv_cache
from models.kv_cache import CacheShape

T, F = True, False
SHAPE = CacheShape(num_layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


def play(forward: Forward) -> None:
    """Write each input id as its key and value (negated) in every layer, as a forward pass would."""
    states = forward.input_ids.float()[:, None, :, None].expand(-1, SHAPE.kv_heads, -1, SHAPE.head_dim)
    for layer in range(SHAPE.num_layers):
        keys, values = forward.cache.update(states, -states, layer)
        assert keys.shape[-2] == forward.attention_mask.shape[-1], "attention covers exactly the cached columns"


def cached_ids(batch: Batch, layer: int = 1) -> list[list[int]]:
    """The token ids cached in the live window, with 0 on padding."""
    store = batch._store
    keys = store.keys[layer][: len(batch), 0, batch.start : batch.end, 0]
    values = store.values[layer][: len(batch), 0, batch.start : batch.end, 0]
    assert torch.equal(keys, -values)
    return keys.masked_fill(~batch.attention_mask(), 0).long().tolist()


def test_build_left_pads_and_counts_positions_from_the_first_real_token() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    forward = batch.prefill(["a", "b"], [[5, 6, 7], [8]])
    assert forward.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert forward.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert forward.real_tokens == 4
    assert forward.attention_mask.shape == (2, 1, 3, 3)
    assert forward.attention_mask[0, 0].tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    # Row b's pads attend only to themselves; its real token never sees a pad.
    assert forward.attention_mask[1, 0].tolist() == [[T, F, F], [F, T, F], [F, F, T]]
    play(forward)
    assert batch.attention_mask().tolist() == [[T, T, T], [F, F, T]]
    assert batch.lengths == [3, 1] and batch.width == 3
    assert cached_ids(batch) == [[5, 6, 7], [0, 0, 8]]


def test_decode_steps_feed_one_token_per_row_at_the_next_position() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["a", "b"], [[5, 6, 7], [8]]))
    forward = batch.decode([10, 11])
    assert forward.input_ids.tolist() == [[10], [11]]
    assert forward.position_ids.tolist() == [[3], [1]]
    assert forward.attention_mask.shape == (2, 1, 1, 4)
    assert forward.attention_mask[:, 0, 0].tolist() == [[T, T, T, T], [F, F, T, T]]
    play(forward)
    forward = batch.decode([12, 13])
    assert forward.position_ids.tolist() == [[4], [2]]
    play(forward)
    assert batch.attention_mask().tolist() == [[T, T, T, T, T], [F, F, T, T, T]]
    assert cached_ids(batch) == [[5, 6, 7, 10, 12], [0, 0, 8, 11, 13]]


def test_filter_drops_rows_and_trims_columns_that_are_padding_everywhere() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["long", "short"], [[1, 2, 3, 4, 5, 6], [7, 8]]))
    play(batch.decode([9, 10]))
    assert batch.width == 7
    batch.filter({"long"})
    assert batch.keys == ["short"] and batch.lengths == [3]
    # The four columns only the long row used are gone: the window is the short row's three tokens.
    assert batch.width == 3 and batch.attention_mask().tolist() == [[T, T, T]]
    assert cached_ids(batch) == [[7, 8, 10]]
    forward = batch.decode([11])
    assert forward.position_ids.tolist() == [[3]]
    assert forward.attention_mask[:, 0, 0].tolist() == [[T, T, T, T]]


def test_filter_moves_tail_rows_into_holes_and_keeps_their_cache() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=8)
    play(batch.prefill(["a", "b", "c", "d", "e"], [[1], [2, 3], [4, 5, 6], [7], [8, 9]]))
    play(batch.decode([11, 12, 13, 14, 15]))
    batch.filter({"a", "c"})
    assert sorted(batch.keys) == ["b", "d", "e"]
    # c was the widest row; without it the window narrows to three columns.
    expected = {"b": [2, 3, 12], "d": [0, 7, 14], "e": [8, 9, 15]}
    assert cached_ids(batch) == [expected[key] for key in batch.keys]
    assert batch.lengths == [sum(1 for t in expected[key] if t) for key in batch.keys]
    forward = batch.decode([20, 21, 22])
    assert forward.position_ids.tolist() == [[batch.lengths[i] - 1] for i in range(3)]


def test_concat_pads_the_shorter_side_on_the_left() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["old"], [[1, 2]]))
    play(batch.decode([3]))
    # A newcomer longer than the running rows: the running row gains padding on its left.
    forward = batch.prefill(["new"], [[4, 5, 6, 7, 8]])
    assert forward.input_ids.tolist() == [[4, 5, 6, 7, 8]]
    assert forward.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    play(forward)
    assert batch.keys == ["old", "new"] and batch.lengths == [3, 5]
    assert batch.attention_mask().tolist() == [[F, F, T, T, T], [T, T, T, T, T]]
    assert cached_ids(batch) == [[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]]
    # A newcomer shorter than the running rows is padded on its own left instead.
    forward = batch.prefill(["tiny"], [[9]])
    assert forward.input_ids.tolist() == [[9]] and forward.position_ids.tolist() == [[0]]
    play(forward)
    assert batch.attention_mask().tolist() == [[F, F, T, T, T], [T, T, T, T, T], [F, F, F, F, T]]
    forward = batch.decode([30, 31, 32])
    assert forward.position_ids.tolist() == [[3], [5], [1]]
    assert forward.attention_mask[:, 0, 0].tolist() == [
        [F, F, T, T, T, T],
        [T, T, T, T, T, T],
        [F, F, F, F, T, T],
    ]
    play(forward)
    assert cached_ids(batch) == [[0, 0, 1, 2, 3, 30], [4, 5, 6, 7, 8, 31], [0, 0, 0, 0, 9, 32]]


def test_columns_entering_the_window_unwritten_are_zero() -> None:
    """Stale values left by departed rows must not be read as finite garbage or NaN by the newcomers."""
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["x", "y"], [[1, 2, 3, 4], [5]]))
    batch._store.keys[0].fill_(float("nan"))  # poison everything, live columns included
    batch.filter({"x"})
    play(batch.prefill(["z"], [[6, 7, 8]]))
    window = batch._store.keys[0][: len(batch), 0, batch.start : batch.end, 0]
    padding = ~batch.attention_mask()
    assert not torch.isnan(window[1]).any(), "the newcomer's row was written or zeroed"
    assert torch.isnan(window[0][~padding[0]]).all(), "the survivor's own (poisoned) tokens were left alone"
    assert (window[0][padding[0]] == 0).all(), "the survivor's new left padding was zeroed"


def test_storage_grows_and_survives_reallocation() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["a"], [[1, 2]]))
    rows, cols = batch.capacity
    tokens = []
    for step in range(cols + 5):  # more decode steps than the first allocation has columns
        tokens.append(100 + step)
        play(batch.decode([tokens[-1]]))
    assert batch.capacity[1] > cols
    play(batch.prefill(["b", "c", "d"], [[7], [8], [9]]))
    assert batch.capacity[0] >= 4
    assert cached_ids(batch)[0] == [1, 2, *tokens]
    assert [row[-1] for row in cached_ids(batch)[1:]] == [7, 8, 9]


def test_emptying_the_batch_releases_its_storage() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["a", "b"], [[1, 2], [3]]))
    batch.filter({"a", "b"})
    assert len(batch) == 0 and batch.capacity == (0, 0) and batch.width == 0
    play(batch.prefill(["c"], [[4]]))
    assert cached_ids(batch) == [[4]]


def test_adopt_forks_new_rows_and_reorders_through_a_gather() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=8)
    play(batch.prefill(["x", "s0"], [[9, 9, 9], [5, 6]]))
    # Fork: s0 stays and two new rows copy it (as a beam search's first step does).
    batch.adopt(["s0", "s1", "s2"], ["s0", "s0", "s0"])
    assert batch.keys == ["x", "s0", "s1", "s2"]
    assert batch.lengths == [3, 2, 2, 2]
    play(batch.decode([1, 7, 8, 4]))
    assert cached_ids(batch) == [[9, 9, 9, 1], [0, 5, 6, 7], [0, 5, 6, 8], [0, 5, 6, 4]]
    # Reorder with a duplicated parent that is itself overwritten: every child reads its parent as it was.
    batch.adopt(["s0", "s1", "s2"], ["s2", "s0", "s2"])
    assert cached_ids(batch) == [[9, 9, 9, 1], [0, 5, 6, 4], [0, 5, 6, 7], [0, 5, 6, 4]]
    batch.filter({"s1"})
    assert cached_ids(batch) == [[9, 9, 9, 1], [0, 5, 6, 4], [0, 5, 6, 4]]


def write(batch: Batch, row: int, column: int, tokens: list[int]) -> None:
    """Write tokens as cached keys and values of `row` from `column` on, as the prefix cache loads them."""
    store = batch.store
    for layer in range(SHAPE.num_layers):
        states = torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(SHAPE.kv_heads, -1, SHAPE.head_dim)
        store.keys[layer][row, :, column : column + len(tokens)] = states
        store.values[layer][row, :, column : column + len(tokens)] = -states


def test_a_row_reusing_cached_tokens_computes_only_the_group_columns_with_positions_after_them() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    play(batch.prefill(["old"], [[1, 2]]))
    # "hit" reuses 4 of its 6 tokens and computes 2; "fresh" computes its 2; "one" is padded to 2.
    forward = batch.prefill(["hit", "fresh", "one"], [[3, 4, 5, 6, 7, 8], [9, 10], [11]], reused=[4, 0, 0])
    assert forward.input_ids.tolist() == [[7, 8], [9, 10], [0, 11]]
    assert forward.position_ids.tolist() == [[4, 5], [0, 1], [0, 0]]
    assert forward.real_tokens == 5
    # Keys: the group's 6-column window. The reused row sees its 4 cached columns; pads see only themselves.
    assert forward.attention_mask.shape == (3, 1, 2, 6)
    assert forward.attention_mask[0, 0].tolist() == [[T, T, T, T, T, F], [T, T, T, T, T, T]]
    assert forward.attention_mask[1, 0].tolist() == [[F, F, F, F, T, F], [F, F, F, F, T, T]]
    assert forward.attention_mask[2, 0].tolist() == [[F, F, F, F, T, F], [F, F, F, F, F, T]]
    write(batch, 1, batch.first_column(1), [3, 4, 5, 6])
    play(forward)
    assert batch.lengths == [2, 6, 2, 1]
    assert cached_ids(batch) == [[0, 0, 0, 0, 1, 2], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 9, 10], [0, 0, 0, 0, 0, 11]]
    forward = batch.decode([20, 21, 22, 23])
    assert forward.position_ids.tolist() == [[2], [6], [2], [1]]


def test_a_reused_row_must_compute_exactly_the_group_columns() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=4)
    # q = 3 (from "long"): a row reusing 4 of 6 computes only 2, so a pad would land on a cached column.
    with pytest.raises(ValueError, match="must compute"):
        batch.prefill(["hit", "long"], [[1, 2, 3, 4, 5, 6], [7, 8, 9]], reused=[4, 0])


def test_extend_feeds_several_tokens_per_row_after_its_past() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=2)
    play(batch.prefill(["a"], [[1, 2]]))
    forward = batch.extend([[3, 4, 5]])
    assert forward.input_ids.tolist() == [[3, 4, 5]]
    assert forward.position_ids.tolist() == [[2, 3, 4]]
    assert forward.attention_mask[0, 0].tolist() == [[T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]]
    play(forward)
    assert cached_ids(batch) == [[1, 2, 3, 4, 5]]


def test_a_prefill_with_room_takes_its_later_extends_without_growing() -> None:
    batch: Batch[str] = Batch(SHAPE, max_rows=1)
    play(batch.prefill(["a"], [[1, 2]], room=300))
    capacity = batch.capacity
    for start in range(3, 303, 100):
        play(batch.extend([list(range(start, start + 100))]))
    assert batch.capacity == capacity, "no reallocation: the store was sized for the whole prompt"
    assert cached_ids(batch) == [[1, 2, *range(3, 303)]]


def test_join_moves_another_batch_rows_in_right_aligned() -> None:
    running: Batch[str] = Batch(SHAPE, max_rows=4)
    play(running.prefill(["a"], [[1, 2]]))
    play(running.decode([3]))
    staging: Batch[str] = Batch(SHAPE, max_rows=1)
    play(staging.prefill(["b"], [[4, 5]]))
    play(staging.extend([[6, 7]]))
    running.join(staging)
    assert len(staging) == 0 and staging.capacity == (0, 0)
    assert running.keys == ["a", "b"] and running.lengths == [3, 4]
    assert cached_ids(running) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    forward = running.decode([8, 9])
    assert forward.position_ids.tolist() == [[3], [4]]
    play(forward)
    assert cached_ids(running) == [[0, 1, 2, 3, 8], [4, 5, 6, 7, 9]]


def test_make_room_readies_the_store_a_join_needs_without_touching_the_live_window() -> None:
    running: Batch[str] = Batch(SHAPE, max_rows=4)
    play(running.prefill(["a", "b"], [[1, 2], [3]]))
    for layers, tokens in ((range(0, 1), [5, 6]), (range(1, 2), [7, 8])):  # a share per chunk, decoding between
        running.make_room(rows=3, width=40, layers=layers)
        play(running.decode(tokens))
    assert cached_ids(running) == [[1, 2, 5, 7], [0, 3, 6, 8]]
    capacity = running.capacity
    for layer in range(SHAPE.num_layers):  # the columns that will be left padding hold zeros, not NaN, already
        assert (running._store.keys[layer][:2, :, running.end - 40 : running.start] == 0).all()
    staging: Batch[str] = Batch(SHAPE, max_rows=1)
    play(staging.prefill(["c"], [list(range(10, 40))]))
    running.join(staging)
    assert running.capacity == capacity, "the join found its store ready"
    assert cached_ids(running) == [[0] * 26 + [1, 2, 5, 7], [0] * 27 + [3, 6, 8], list(range(10, 40))]


def test_a_flattened_forward_writes_each_part_where_its_own_forward_would_and_attends_to_it_alone() -> None:
    running: Batch[str] = Batch(SHAPE, max_rows=2)
    play(running.prefill(["a", "b"], [[1, 2], [3]]))
    staging: Batch[str] = Batch(SHAPE, max_rows=1)
    play(staging.prefill(["c"], [[10, 11]]))
    decode, chunk = running.decode([4, 5]), staging.extend([[12, 13, 14]])
    forward = flatten([decode, chunk])
    assert forward.input_ids.tolist() == [[4, 5, 12, 13, 14]]
    assert forward.position_ids.tolist() == [[2, 1, 2, 3, 4]]
    assert forward.last.tolist() == [0, 1, 4], "each row's last token: the decode rows', then the chunk's"
    assert forward.real_tokens == 5
    states = forward.input_ids.float()[:, None, :, None].expand(-1, SHAPE.kv_heads, -1, SHAPE.head_dim)
    for layer in range(SHAPE.num_layers):
        keys, values = forward.cache.update(states, -states, layer)
        assert isinstance(keys, Parts) and isinstance(values, Parts)
        (mine, theirs) = keys.parts
        assert torch.equal(mine.span.mask, decode.attention_mask) and torch.equal(theirs.span.mask, chunk.attention_mask)
        assert mine.keys[:, 0, :, 0].tolist() == [[1, 2, 4], [0, 3, 5]]
        assert theirs.keys[:, 0, :, 0].tolist() == [[10, 11, 12, 13, 14]]
    assert cached_ids(running) == [[1, 2, 4], [0, 3, 5]]
    assert cached_ids(staging) == [[10, 11, 12, 13, 14]]


def join_thirty_tokens(running: Batch[str]) -> list[slice]:
    """Join a 30-token row "d" to `running`; return the columns the join cleared in the running rows."""
    n, cleared = len(running), []
    clear = running._store.clear
    running._store.clear = lambda rows, cols, layers=None: (cleared.append((rows, cols)), clear(rows, cols, layers))
    staging: Batch[str] = Batch(SHAPE, max_rows=1)
    play(staging.prefill(["d"], [list(range(10, 40))]))
    running.join(staging)
    for layer in range(SHAPE.num_layers):
        window = running._store.keys[layer][: len(running), 0, running.start : running.end, 0]
        assert (window[~running.attention_mask()] == 0).all(), "every pad of the window holds zero"
    return [cols for rows, cols in cleared if rows == slice(0, n)]


def test_a_join_clears_only_what_make_room_has_not_zeroed_or_what_was_written_since() -> None:
    """make_room zeroes the running rows' future left padding ahead of the join, which then skips it; but a row
    moved by a filter since has written there, and what it left must still be cleared."""
    running: Batch[str] = Batch(SHAPE, max_rows=8)
    play(running.prefill(["a", "b", "c"], [[1, 2, 3, 4], [5], [6, 7]]))
    running.make_room(rows=5, width=40, layers=range(0, 1))
    play(running.decode([8, 9, 10]))
    running.make_room(rows=5, width=40, layers=range(1, 2))
    play(running.prefill(["e"], [list(range(50, 60))]))  # longer than the rows: the window widens
    running.filter({"a"})  # e moves into row 0, its tokens from the window's start on
    running.filter({"e"})  # c moves into row 0; e's tokens there fall left of the window
    cleared = join_thirty_tokens(running)
    assert cached_ids(running) == [[0] * 27 + [6, 7, 10], [0] * 28 + [5, 9], list(range(10, 40))]
    assert sum(max(0, c.stop - c.start) for c in cleared) < running.width - 3, "make_room's zeros were kept"


def test_a_join_clears_a_row_appended_after_make_room_in_the_slot_of_one_that_left() -> None:
    running: Batch[str] = Batch(SHAPE, max_rows=8)
    play(running.prefill(["a", "b", "c"], [[1, 2, 3, 4], [5], [6, 7]]))
    for layers in (range(0, 1), range(1, 2)):
        running.make_room(rows=5, width=40, layers=layers)
    running.filter({"c"})
    play(running.prefill(["e"], [list(range(50, 60))]))  # in c's slot, writing over make_room's zeros
    running.filter({"e"})
    play(running.prefill(["f"], [[11, 12]]))  # in the same slot: e's tokens now lie left of the window
    join_thirty_tokens(running)


def test_dropped_stores_go_back_to_the_system_once_they_add_up_and_when_the_batch_empties(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Growing past its store, joining a staging batch and emptying drop a store. The batch returns the C heap's
    freed memory (kv_cache.return_freed_memory) once the stores dropped since the last time add up to
    kv_cache.TRIM_BYTES, and when it empties, so the process does not stay as large as its widest batch; not at
    every drop, since each trim walks the whole heap."""
    calls: list[int] = []
    monkeypatch.setattr(kv_cache, "return_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(kv_cache, "_held", 0)
    batch: Batch[str] = Batch(SHAPE, max_rows=8)
    play(batch.prefill(["a"], [[1, 2]]))
    first = batch.store
    assert first is not None
    staging: Batch[str] = Batch(SHAPE, max_rows=1)
    play(staging.prefill(["c"], [[4] * 10]))
    assert staging.store is not None
    monkeypatch.setattr(kv_cache, "TRIM_BYTES", first.bytes + staging.store.bytes)
    play(batch.prefill(["b"], [[3] * 40]))  # more rows and a wider window: a new store, the first one dropped
    second = batch.store
    assert second is not first and calls == []
    batch.filter({"a"})
    batch.join(staging)  # into a's row: the staging store dropped, and with the first one the bound is reached
    assert batch.store is second and calls == [1]
    batch.filter({"b", "c"})  # empty: at once
    assert calls == [1, 1] and batch.store is None


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(kv_cache._MALLOC_TRIM is None, reason="malloc_trim is glibc's; other C libraries keep their own rules")
def test_return_freed_memory_gives_freed_stores_back_to_the_system() -> None:
    """Stores of a few sizes, each freed after use, as the batch grows and empties under changing load: glibc
    alone keeps hundreds of MiB of them resident (its mmap threshold rises with each free); returned, a few."""
    start = resident_mib()
    for cols in [400, 900, 650, 1200, 300, 1000, 800, 1100] * 3:
        store = [torch.ones(16, 3, cols, 64) for _ in range(20)]
        del store
        kv_cache.return_freed_memory()
    assert resident_mib() - start < 64
