"""The sampler: each row by its own parameters, hand-computed where the arithmetic is small."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from models.sampler import make_generator, sample


@dataclass
class Params:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(eq=False)
class Row:
    params: Params = field(default_factory=Params)
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    suppressed: tuple[int, ...] = ()

    def suppressed_token_ids(self) -> tuple[int, ...]:
        return self.suppressed

    def allowed_tokens(self) -> None:
        return None


def logits_of(*probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in probabilities])


def draw(logits: torch.Tensor, rows: list[Row], seeds: list[int] | None = None) -> list[int]:
    generators = [make_generator(s) for s in (seeds or [0] * len(rows))]
    return sample(logits, rows, generators).tolist()


def frequencies(probabilities: list[float], params: Params, n: int = 4000) -> dict[int, float]:
    logits = logits_of(probabilities)
    generator = make_generator(7)
    counts = Counter(sample(logits.clone(), [Row(params)], [generator]).item() for _ in range(n))
    return {token: count / n for token, count in counts.items()}


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    assert draw(logits, [Row(), Row()]) == [1, 0]


def test_temperature_sampling_follows_the_distribution() -> None:
    freq = frequencies([0.5, 0.3, 0.2], Params(temperature=1.0))
    for token, p in enumerate([0.5, 0.3, 0.2]):
        assert freq[token] == pytest.approx(p, abs=0.03)


def test_low_temperature_sharpens() -> None:
    freq = frequencies([0.5, 0.3, 0.2], Params(temperature=0.25))
    # p^4 normalised: 0.0625, 0.0081, 0.0016 -> 0.87, 0.11, 0.02
    assert freq[0] == pytest.approx(0.87, abs=0.03)


def test_top_k_keeps_only_the_k_most_likely() -> None:
    freq = frequencies([0.4, 0.35, 0.25], Params(temperature=1.0, top_k=2))
    assert set(freq) == {0, 1}
    assert freq[0] == pytest.approx(0.4 / 0.75, abs=0.03)


def test_top_p_keeps_the_smallest_head_holding_p() -> None:
    # Mass before each token: 0, 0.5, 0.8. With top_p 0.7 tokens 0 and 1 stay, token 2 goes.
    freq = frequencies([0.5, 0.3, 0.2], Params(temperature=1.0, top_p=0.7))
    assert set(freq) == {0, 1}
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.03)


def test_min_p_drops_tokens_far_below_the_best() -> None:
    # Threshold 0.5 * 0.6 = 0.3: token 2 (0.1) goes, token 1 (0.3) stays.
    freq = frequencies([0.6, 0.3, 0.1], Params(temperature=1.0, min_p=0.5))
    assert set(freq) == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.9]])
    row = Row(Params(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    # Seen: 0 (prompt) -> 2.0 / 2 = 1.0; 1 (output) -> -1.0 * 2 = -2.0; unseen 2 and 3 unchanged.
    assert draw(logits.clone(), [row]) == [3]
    assert draw(logits.clone(), [Row()]) == [0]


def test_presence_and_frequency_penalties_use_output_counts() -> None:
    # Token 1 seen twice: 3.0 - 0.5 - 2 * 0.4 = 1.7; token 2 once: 2.0 - 0.5 - 0.4 = 1.1; token 0: 1.8.
    logits = torch.tensor([[1.8, 3.0, 2.0]])
    row = Row(Params(presence_penalty=0.5, frequency_penalty=0.4), prompt_ids=[1, 1, 1], output_ids=[1, 2, 1])
    assert draw(logits, [row]) == [0]


def test_penalties_read_each_rows_own_tokens_only() -> None:
    logits = torch.tensor([[1.0, 1.2], [1.0, 1.2]])
    penalized = Row(Params(frequency_penalty=1.0), output_ids=[1])
    untouched = Row(Params(frequency_penalty=1.0), output_ids=[0] * 50)
    # The second row's long history (and any padding to it) must not reach the first row, and vice versa.
    assert draw(logits, [penalized, untouched]) == [0, 1]


def test_suppressed_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[9.0, 1.0, 0.5]])
    assert draw(logits.clone(), [Row(suppressed=(0,))]) == [1]
    assert draw(logits.clone(), [Row(Params(temperature=5.0), suppressed=(0, 1))], seeds=[3]) == [2]


def test_a_seeded_row_draws_the_same_alone_and_beside_others() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    rows = [Row(Params(temperature=1.0, top_p=0.9, seed=s)) for s in range(5)]
    together = []
    generators = [make_generator(s) for s in range(5)]
    for _ in range(20):
        together.append(sample(logits.clone(), rows, generators).tolist())
    alone_generator = make_generator(3)
    alone = [sample(logits[3:4].clone(), [rows[3]], [alone_generator]).item() for _ in range(20)]
    assert [step[3] for step in together] == alone
    assert len(set(alone)) > 1, "the draws should vary from step to step"
