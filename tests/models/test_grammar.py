"""Grammar masks on the logits: bit unpacking, in place, constrained rows only, before everything else."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.grammar import apply_masks, unpack
from models.sampler import make_generator, sample
from tests.models.test_sampler import Params


def bitmask(allowed: list[int], vocab: int) -> np.ndarray:
    words = np.zeros((vocab + 31) // 32, dtype=np.int64)
    for token in allowed:
        words[token // 32] |= 1 << (token % 32)
    return words.astype(np.uint32).view(np.int32)  # bit 31 set makes a negative int32, as llguidance writes it


@dataclass(eq=False)
class Row:
    mask: np.ndarray | None = None
    params: Params = field(default_factory=Params)
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    suppressed: tuple[int, ...] = ()

    def suppressed_token_ids(self) -> tuple[int, ...]:
        return self.suppressed

    def allowed_tokens(self) -> np.ndarray | None:
        return self.mask


def test_unpack_reads_bit_t_mod_32_of_word_t_div_32() -> None:
    allowed = [0, 5, 31, 32, 63, 64, 69]
    bits = unpack(torch.from_numpy(bitmask(allowed, 70)[None, :]), 70)
    assert bits.shape == (1, 70)
    assert torch.nonzero(bits[0]).flatten().tolist() == allowed
    # A mask shorter than the logits allows nothing past its end.
    assert unpack(torch.from_numpy(bitmask([1], 32)[None, :]), 40)[0].nonzero().flatten().tolist() == [1]


def test_only_constrained_rows_are_masked_and_free_rows_are_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    before = logits.clone()
    rows = [Row(bitmask([3, 40, 99], 100)), Row(), Row(bitmask([7], 100))]
    apply_masks(logits, rows)
    assert torch.equal(logits[1], before[1])
    for i, allowed in ((0, [3, 40, 99]), (2, [7])):
        assert torch.isfinite(logits[i]).nonzero().flatten().tolist() == allowed
        assert torch.equal(logits[i, allowed], before[i, allowed])


def test_no_step_after_the_mask_brings_a_masked_token_back() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 64) * 5
    logits[:, 10] = 50.0  # the favourite, masked everywhere
    rows = [
        Row(bitmask([1, 2], 64)),
        Row(bitmask([1, 2], 64), Params(temperature=1.5, top_k=5, top_p=0.9)),
        Row(bitmask([1, 2], 64), Params(repetition_penalty=2.0, frequency_penalty=2.0), output_ids=[1, 1, 2]),
        Row(bitmask([1, 2], 64), Params(temperature=2.0), suppressed=(1,)),
    ]
    generators = [make_generator(s) for s in range(4)]
    for _ in range(50):
        tokens = sample(logits.clone(), rows, generators).tolist()
        assert all(t in (1, 2) for t in tokens), tokens
        assert tokens[3] == 2


def test_a_batch_of_constrained_rows_only_is_masked_in_place() -> None:
    logits = torch.zeros(2, 40)
    apply_masks(logits, [Row(bitmask([0, 39], 40)), Row(bitmask([33], 40))])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 39]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [33]
