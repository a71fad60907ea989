"""Logits -> next token, one per row, each row by its own parameters; and a step's logits -> each row's
`Sampled` (its token, its scores, a beam search's candidates) after one device-to-host copy (`sample_step`).

Vectorised over rows; what cannot be (a row's random draw) uses that row's own generator, so a seeded
row draws the same numbers whatever else is in the batch. The order is vLLM's: suppressed tokens,
penalties, then greedy argmax or temperature, top-k, top-p, min-p and an inverse-CDF draw. A constrained
row's grammar mask comes before all of them (models/grammar.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from models import native
from models.grammar import apply_masks
from models.types import Candidate, Row, Sampled, TokenLogprobs


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one row: seeded rows repeat, unseeded rows draw a fresh seed."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] -> float32 log-probabilities [rows, vocab], computed before any processing
    (vLLM's `raw_logprobs`): what the model says, whatever temperature, penalties or top-p do next."""
    return torch.log_softmax(logits.float(), dim=-1)


def score(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """logprobs [rows, vocab], tokens [rows] -> [rows, 2 + 2k] float64: the token, its logprob, the k most
    likely ids, then their logprobs. float64 holds both ids and float32 values exactly, so a whole step's
    scores travel to the host with its tokens in one copy."""
    chosen = logprobs.gather(-1, tokens[:, None])  # [rows, 1]
    top = logprobs.topk(k, dim=-1) if k else None
    parts = [tokens[:, None], chosen] + ([top.indices, top.values] if top is not None else [])
    return torch.cat([p.double() for p in parts], dim=-1)


def unpack_scores(values: Sequence[float], k: int, keep: int) -> TokenLogprobs:
    """One row of `score`'s output -> TokenLogprobs with the first `keep` (<= k) top entries."""
    top = tuple((int(values[2 + i]), values[2 + k + i]) for i in range(keep))
    return TokenLogprobs(token_id=int(values[0]), logprob=values[1], top=top)


def beam_candidates(logits: torch.Tensor, rows: Sequence[Row], top: int) -> torch.Tensor:
    """logits [beams, vocab] of one search's rows, in slot order -> its `keep` best continuations as
    [keep, 4 + 2 * top] float64: score, parent slot, token, the token's raw logprob, then `top` ids and values.

    As transformers' beam search: log_softmax in float32, suppressed tokens set to -inf after it (so scores stay
    those of the whole distribution), the parent's score added, and the top `keep` over all beams' tokens at once.
    NOTE: `rows` hold slots 0..beams-1 in order, so a flat index // vocab is the parent's slot.
    """
    logprobs = raw_logprobs(logits)  # [beams, vocab]
    processed = logprobs
    banned = [(i, list(row.suppressed_token_ids())) for i, row in enumerate(rows) if row.suppressed_token_ids()]
    if banned:
        processed = logprobs.clone()
        for i, tokens in banned:
            processed[i, tokens] = float("-inf")
    scores = torch.tensor([row.beam.score for row in rows], dtype=torch.float32, device=logits.device)  # [beams]
    total = (processed + scores[:, None]).reshape(-1)  # [beams * vocab]
    best = total.topk(rows[0].beam.keep)
    vocab = logits.shape[-1]
    parent, token = best.indices // vocab, best.indices % vocab  # [keep]
    parts = [best.values, parent, token, logprobs[parent, token]]
    if top:
        entries = logprobs[parent].topk(top, dim=-1)  # [keep, top]
        parts += [entries.indices, entries.values]
    return torch.cat([p.double().reshape(len(parent), -1) for p in parts], dim=-1)


def unpack_candidates(values: Sequence[float], top: int, keep_top: int) -> tuple[Candidate, ...]:
    """`beam_candidates`' output, flattened -> Candidates with the first `keep_top` (<= top) top entries."""
    width = 4 + 2 * top
    candidates = []
    for at in range(0, len(values), width):
        row = values[at : at + width]
        entries = tuple((int(row[4 + i]), row[4 + top + i]) for i in range(keep_top))
        candidates.append(Candidate(int(row[1]), row[0], TokenLogprobs(int(row[2]), row[3], entries)))
    return tuple(candidates)


def sample(logits: torch.Tensor, rows: Sequence[Row], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """logits [rows, vocab] -> token ids [rows] (int64, on the logits' device). Float32 logits are
    modified in place."""
    logits = logits.float()
    # Grammar masks first, on the raw logits: nothing after this step can bring a masked token back.
    apply_masks(logits, rows)
    _suppress(logits, rows)
    _penalize(logits, rows)
    tokens = argmax(logits)
    sampled = [i for i, row in enumerate(rows) if row.params.temperature > 0]
    if not sampled:
        return tokens
    device = logits.device
    index = torch.tensor(sampled, device=device)
    params = [rows[i].params for i in sampled]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    probs = torch.softmax(logits.index_select(0, index) / temperature[:, None], dim=-1)  # [sampled, vocab]
    probs = _min_p(probs, torch.tensor([p.min_p for p in params], device=device))
    # One uniform draw per row, from the row's own generator, always on the CPU so a draw never depends
    # on the device or on the batch; then one copy to the device.
    uniform = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(device)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        vocab = probs.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        choice = _draw_top_k_top_p(probs, uniform, top_k, top_p)
    else:
        choice = _draw(probs, uniform)
    tokens[index] = choice
    return tokens


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token, [rows, vocab] float32 -> [rows]: models/native.cpp's `argmax` where it loaded (the
    same answer as torch.argmax, first index on ties; ATen's took 0.7-1.3 ms over 32 rows of 49152 logits on a
    2-core AVX-512 EPYC), else torch's."""
    if logits.device.type == "cpu" and logits.is_contiguous() and native.loaded():
        return torch.ops.tokenferry.argmax(logits)
    return logits.argmax(dim=-1)


def _suppress(logits: torch.Tensor, rows: Sequence[Row]) -> None:
    for i, row in enumerate(rows):
        banned = row.suppressed_token_ids()
        if banned:
            logits[i, list(banned)] = float("-inf")


def _penalize(logits: torch.Tensor, rows: Sequence[Row]) -> None:
    """Repetition, presence and frequency penalties, as vLLM and OpenAI define them.

    Histories are scattered as flat (row, token) pairs of each row's own tokens, so padding never counts.
    """
    penalized = [
        i
        for i, row in enumerate(rows)
        if row.params.repetition_penalty != 1 or row.params.presence_penalty or row.params.frequency_penalty
    ]
    if not penalized:
        return
    device = logits.device
    index = torch.tensor(penalized, device=device)
    sub = logits.index_select(0, index)  # [penalized, vocab]

    out_rows = [n for n, i in enumerate(penalized) for _ in rows[i].output_ids]
    out_tokens = [t for i in penalized for t in rows[i].output_ids]
    counts = torch.zeros_like(sub)
    if out_tokens:
        counts.index_put_(
            (torch.tensor(out_rows, device=device), torch.tensor(out_tokens, device=device)),
            torch.ones(len(out_tokens), device=device),
            accumulate=True,
        )
    params = [rows[i].params for i in penalized]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if (repetition != 1).any():
        seen = counts > 0
        prompt_rows = [n for n, i in enumerate(penalized) for _ in rows[i].prompt_ids]
        prompt_tokens = [t for i in penalized for t in rows[i].prompt_ids]
        if prompt_tokens:
            seen[torch.tensor(prompt_rows, device=device), torch.tensor(prompt_tokens, device=device)] = True
        penalized_logits = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, penalized_logits, sub)
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    sub = sub - presence * (counts > 0) - frequency * counts
    logits[index] = sub


def _min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's most likely token's."""
    if not (min_p > 0).any():
        return probs
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative mass exceeds u times the row's total mass.

    Zero-probability tokens never advance the cumulative sum, so they can never be the first to exceed it.
    """
    cdf = probs.cumsum(dim=-1)  # [rows, vocab]
    target = uniform[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _draw_top_k_top_p(
    probs: torch.Tensor, uniform: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Keep the k most likely tokens and the smallest head holding top_p of the mass, then draw among them."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # The most likely token is always kept: its mass_before is 0 and its rank is 0.
    keep = (ranks < top_k[:, None]) & (mass_before < top_p[:, None] * sorted_probs.sum(dim=-1, keepdim=True))
    picked = _draw(sorted_probs * keep, uniform)
    return order.gather(-1, picked[:, None]).squeeze(-1)


@torch.inference_mode()
def sample_step(
    logits: torch.Tensor, rows: Sequence[Row], generators: Mapping[Row, torch.Generator], prompt_scores: bool
) -> list[Sampled]:
    """One step's logits [rows, q, vocab] -> each row's Sampled: its token (or, for a beam search, the
    search's candidates) and the scores it asked for, and at a prefill (`prompt_scores`) its prompt's, all
    after one device-to-host copy."""
    last = logits[:, -1, :]  # [rows, vocab]
    searches = _beam_groups(rows)
    plain = [i for i, row in enumerate(rows) if row.beam is None]
    asked = [i for i in plain if rows[i].params.logprobs is not None]
    k = max((rows[i].params.logprobs for i in asked), default=0)
    # Scores and beam candidates come from the raw logits, so they are taken before sampling modifies them in place.
    logprobs = raw_logprobs(last[asked]) if asked else None
    beam_top = [rows[group[0]].params.logprobs or 0 for group in searches]
    beam_parts = [beam_candidates(last[group], [rows[i] for i in group], top) for group, top in zip(searches, beam_top)]
    if searches:  # beam rows draw no token of their own
        tokens = torch.full((len(rows),), -1, dtype=torch.long, device=last.device)
        if plain:
            tokens[plain] = sample(last[plain], [rows[i] for i in plain], [generators[rows[i]] for i in plain])
    else:
        tokens = sample(last, rows, [generators[row] for row in rows])
    parts = [tokens]
    if logprobs is not None:
        parts.append(score(logprobs, tokens[asked], k))
    scored_prompts = [i for i, row in enumerate(rows) if prompt_scores and row.params.prompt_logprobs is not None]
    for i in scored_prompts:
        parts.append(_prompt_scores(logits[i], rows[i]))
    parts += beam_parts
    values = to_host(parts)  # the step's one device-to-host copy

    results = [Sampled(token=int(t)) for t in values[0]]
    if asked:
        width = 2 + 2 * k
        for n, i in enumerate(asked):
            row_values = values[1][n * width : (n + 1) * width]
            results[i] = Sampled(results[i].token, unpack_scores(row_values, k, rows[i].params.logprobs))
    for part, i in enumerate(scored_prompts, start=len(parts) - len(beam_parts) - len(scored_prompts)):
        k_prompt = rows[i].params.prompt_logprobs
        width = 2 + 2 * k_prompt
        flat = values[part]
        prompt = tuple(unpack_scores(flat[j : j + width], k_prompt, k_prompt) for j in range(0, len(flat), width))
        results[i] = Sampled(results[i].token, results[i].logprobs, prompt)
    for part, (group, top) in enumerate(zip(searches, beam_top), start=len(parts) - len(searches)):
        candidates = unpack_candidates(values[part], top, top)
        for i in group:
            results[i] = replace(results[i], candidates=candidates)
    return results


def _prompt_scores(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """logits [q, vocab] of one prefill row -> `score` rows for its prompt tokens 1..P-1.

    NOTE: the row is right-aligned in its group of width q, so its P prompt tokens sit at the last P
    positions, and the logits at position j predict the token at j + 1: positions [q-P, q-1) score
    prompt[1:]. The first prompt token has no score (nothing predicts it).
    """
    prompt = row.prompt_ids
    q = logits.shape[0]
    predicted = torch.tensor(prompt[1:], device=logits.device, dtype=torch.long)
    return score(raw_logprobs(logits[q - len(prompt) : q - 1]), predicted, row.params.prompt_logprobs)


def _beam_groups(rows: Sequence[Row]) -> list[list[int]]:
    """Row indices of each beam search in the batch, each in slot order (what `beam_candidates` expects)."""
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        if row.beam is not None:
            groups.setdefault(row.beam.group, []).append(i)
    return [sorted(group, key=lambda i: rows[i].beam.slot) for group in groups.values()]


def to_host(parts: Sequence[torch.Tensor]) -> list[list[float]]:
    """Several tensors in one device-to-host copy: flattened into one float64 tensor, then split again."""
    flat = torch.cat([p.reshape(-1).double() for p in parts]).tolist()
    out, at = [], 0
    for part in parts:
        out.append(flat[at : at + part.numel()])
        at += part.numel()
    return out
