"""The only code that runs the model (models/decoder.py's forward for a Llama, transformers' for others):
prefill newcomers, decode every row, sample one token per row.

The engine thread drives it with its own row objects as keys (server/row.py); `prefill` and `decode` each run
one forward under `torch.inference_mode` and return plain Python values after one device-to-host copy:
each row's token and, for rows that asked, its raw log-probabilities (and, at prefill, its prompt's).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Generic, TypeVar

import torch
from transformers import PreTrainedModel

from models import decoder
from models.batch import Batch
from models.forward import Forward, flatten
from models.kv_cache import CacheShape
from models.prefix_cache import PrefixCache
from models.types import Part, PartsFailed, Row, Sampled
from models.sampler import make_generator, sample_step, to_host

R = TypeVar("R", bound=Row)


class ModelRunner(Generic[R]):
    """Owns the model, the running batch, the prefix cache and each row's random generator.

    A prompt read in a decode step (`decode_with`: whole, or in chunks over several steps) lives in a batch of its
    own (same layout, own store) while it is read. Once read it counts as running, but moves into the running
    batch (one column copy) only at its next decode step: the running rows never hold a half-read prompt, and one
    whose first token ended it, dropped before then, never widens them.
    """

    def __init__(self, model: PreTrainedModel, max_rows: int, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.batch: Batch[R] = Batch(CacheShape.of(model), max_rows)
        self.prefix_cache = prefix_cache
        self._fused = decoder.fused(model)  # a Llama: models/decoder.py's forward, not transformers'
        self._staging: dict[R, Batch[R]] = {}  # rows whose prompts are being read, or read and not joined yet
        self._generators: dict[R, torch.Generator] = {}

    @property
    def rows(self) -> list[R]:
        """The running rows in the order of their samples: the batch's, then rows whose prompts were read that join it
        at their next decode step."""
        return [*self.batch.keys, *self._read()]

    @property
    def store_bytes(self) -> int:
        """KV storage allocated for the running batch and the prompts being read in decode steps."""
        batches = [self.batch, *self._staging.values()]
        return sum(b.store.bytes for b in batches if b.store is not None)

    @property
    def staged(self) -> list[R]:
        """Rows whose prompts are being read in chunks."""
        return [row for row in self._staging if not self._prompt_read(row)]

    def prefill(self, rows: Sequence[R], reused: Sequence[int] | None = None) -> list[Sampled]:
        """Add `rows` to the batch, prefill their prompts as one group, return each one's first token.

        `reused[i]` leading prompt tokens of row i are read from the prefix cache instead of computed (see
        `Batch.prefill` for which values a group allows). On failure the new rows are dropped again and the
        running ones are untouched.
        """
        reused = list(reused) if reused is not None else [0] * len(rows)
        n = len(self.batch)
        forward = self.batch.prefill(rows, [row.prompt_ids for row in rows], reused)
        for row in rows:
            self._generators[row] = make_generator(row.params.seed)
        # Prompt scores need every position's logits, which costs a vocabulary-wide projection per prompt
        # token: only groups with a row that asks pay it (the scheduler groups such rows apart from the others).
        every_position = any(row.params.prompt_logprobs is not None for row in rows)
        try:
            for i, tokens in enumerate(reused):
                if tokens:
                    self._load(self.batch, n + i, rows[i].prompt_ids, tokens)
            return self._sample(self._forward(forward, every_position), rows, every_position)
        except BaseException:
            self.drop(rows)
            raise

    def decode_with(self, parts: Sequence[Part[R]], decode: bool = True) -> tuple[list[Sampled], list[Sampled | None]]:
        """One forward: a decode step for every running row (unless `decode` is False, or none runs) and each
        part's next prompt tokens, each prompt in a staging batch of its own (made at its first part). The parts'
        tokens ride in the decode rows' matrix products, so the step reads the weights once for all of them.
        Returns the running rows' samples (none without the decode step), and per part its row's first token if
        its whole prompt has now been read (the row then runs, after the step's rows), else None.

        Raises PartsFailed, with every row as it was before the call (the running rows, and each part's prompt
        read as far as before), if a part or the forward carrying them fails: the caller can still decode the
        running rows alone, and read the parts again."""
        self._join_read()
        rows = list(self.rows) if decode else []
        # How far each part's prompt had been read, to restore on failure (None: not begun).
        before = {part.row: staging.lengths[0] if (staging := self._staging.get(part.row)) else None for part in parts}
        step = None
        try:
            forwards = [self._read_part(part) for part in parts]  # first: readying the running store may reallocate it
            if rows:
                step = self.batch.decode([r.output_ids[-1] for r in rows])
            logits = self._forward(flatten([step, *forwards] if step else forwards), every_position=False)  # [rows + parts, 1, vocab]
        except Exception as exc:
            if step is not None:  # the step's column, possibly half written, is written again by the next step
                self.batch.rewind(1)
            self._unread(before)
            raise PartsFailed from exc
        done = [i for i, part in enumerate(parts) if self._prompt_read(part.row)]
        try:
            keep = [*range(len(rows)), *(len(rows) + i for i in done)]  # a prompt read only in part samples nothing
            samples = self._sample(logits[keep], [*rows, *(parts[i].row for i in done)], prompt_scores=False)
        except BaseException:
            self.drop([part.row for part in parts])
            raise
        firsts: list[Sampled | None] = [None] * len(parts)
        for i, sampled in zip(done, samples[len(rows) :], strict=True):
            firsts[i] = sampled
        return samples[: len(rows)], firsts

    def _unread(self, before: dict[R, int | None]) -> None:
        """Take back what reading parts added: a prompt not begun before forgets its staging batch (and its
        generator, made anew with it), one begun keeps only the tokens it had read."""
        for row, length in before.items():
            staging = self._staging.get(row)
            if length is None:
                self._staging.pop(row, None)
                self._generators.pop(row, None)
            elif staging is not None and staging.lengths[0] > length:
                staging.rewind(staging.lengths[0] - length)

    def _read_part(self, part: Part[R]) -> Forward:
        """The forward of `part`'s tokens in its row's staging batch (made at its first part)."""
        row, tokens, reused = part.row, part.tokens, part.reused
        staging = self._staging.get(row)
        prompt = len(row.prompt_ids)
        if staging is None:
            staging = self._staging[row] = Batch(self.batch.shape, max_rows=1)
            self._generators[row] = make_generator(row.params.seed)
            # The staging store is sized for the whole prompt at once: growing it chunk by chunk would copy it.
            forward = staging.prefill([row], [row.prompt_ids[: reused + tokens]], [reused], room=prompt - reused - tokens)
            if reused:
                self._load(staging, 0, row.prompt_ids, reused)
            before = 0
        else:
            before = staging.lengths[0]
            forward = staging.extend([row.prompt_ids[before : before + tokens]])
        # Each part readies the share of the running batch's layers that it brings the prompt's share read
        # to: from layer 0 at the first (cached tokens included) to the last layer at the last. Every staged
        # row joins at its next decode step, so the room is for all of them.
        if part.decodes:
            layers = self.batch.shape.num_layers
            share = range(layers * before // prompt, layers * staging.lengths[0] // prompt)
            self.batch.make_room(len(self.batch) + len(self._staging), prompt, share)
        return forward

    def _prompt_read(self, row: R) -> bool:
        """Whether `row`'s whole prompt has been read (its last part is done)."""
        return self._staging[row].lengths[0] == len(row.prompt_ids)

    def _read(self) -> list[R]:
        """Rows whose prompts have been read in decode steps and that have not joined the running batch yet."""
        return [row for row in self._staging if self._prompt_read(row)]

    def _join_read(self) -> None:
        """Move the rows whose prompts have been read from their staging batches into the running one."""
        for row in self._read():
            self.batch.join(self._staging.pop(row))

    def save(self, rows: Collection[R]) -> int:
        """Keep the full blocks of these running rows' cached tokens (prompt, then output) in the prefix cache;
        returns how many blocks were new."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        new, rows = 0, set(rows)
        places = [(self.batch, i) for i, key in enumerate(self.batch.keys) if key in rows]
        places += [(self._staging[row], 0) for row in self._read() if row in rows]
        for batch, i in places:
            key = batch.keys[i]
            length = batch.lengths[i]  # the last sampled token is not fed yet: no KV
            tokens = [*key.prompt_ids, *key.output_ids][:length]
            new += cache.save(batch.store, i, batch.first_column(i), cache.keys_of(tokens))
        return new

    def decode(self) -> list[Sampled]:
        """One step for every row: feed its last sampled token, return its next one."""
        self._join_read()
        rows = self.rows
        forward = self.batch.decode([row.output_ids[-1] for row in rows])
        return self._sample(self._forward(forward, every_position=False), rows, prompt_scores=False)

    def adopt(self, children: Sequence[R], parents: Sequence[R]) -> None:
        """Beam search: row `children[i]` continues from row `parents[i]`'s cache (new children are added)."""
        self._join_read()
        self.batch.adopt(children, parents)

    def verify(self, draft: Sequence[int]) -> list[Sampled]:
        """For a batch of one greedy row: check `draft` (prompt-lookup tokens) in one forward over the row's
        last token and the draft, and return the tokens greedy decoding makes: the draft's longest prefix
        that matches the model's argmax, then the model's own next token. Rejected columns are rewound.

        Only for rows that take the plain argmax of the raw logits (server/speculation.py `eligible`).
        """
        self._join_read()
        (row,) = self.rows
        forward = self.batch.extend([[row.output_ids[-1], *draft]])
        logits = self._forward(forward, every_position=True)  # [1, 1 + len(draft), vocab]
        # NOTE: position j's logits predict the token after input j: position 0 checks draft[0], and the
        # position after the last accepted draft token gives the model's own next token.
        predicted = [int(t) for t in to_host([logits[0].float().argmax(dim=-1)])[0]]
        accepted = 0
        while accepted < len(draft) and predicted[accepted] == draft[accepted]:
            accepted += 1
        self.batch.rewind(len(draft) - accepted)
        return [Sampled(token) for token in predicted[: accepted + 1]]

    def drop(self, rows: Collection[R]) -> None:
        """Remove rows from the batch or from their staging batch (finished, cancelled or failed)."""
        self.batch.filter(rows)
        for row in rows:
            self._staging.pop(row, None)
            self._generators.pop(row, None)

    def _load(self, batch: Batch[R], row: int, prompt: Sequence[int], tokens: int) -> None:
        """Write the cached KV of `prompt`'s first `tokens` tokens into `row` of `batch`, where they belong."""
        cache = self.prefix_cache
        if cache is None:
            raise ValueError("reusing cached tokens needs a prefix cache")
        keys = cache.keys_of(prompt[: -(-tokens // cache.block_tokens) * cache.block_tokens])
        cache.load(batch.store, row, batch.first_column(row), keys, tokens)

    @torch.inference_mode()
    def _forward(self, forward: Forward, every_position: bool) -> torch.Tensor:
        """logits [rows, q or 1, vocab]; a flattened forward gives each row's last token's only."""
        if self._fused:
            return decoder.forward(self.model, forward, every_position)
        flat = forward.last is not None
        output = self.model(
            input_ids=forward.input_ids,
            position_ids=forward.position_ids,
            attention_mask=forward.attention_mask,
            cache=forward.cache,
            use_cache=True,
            logits_to_keep=forward.last if flat else 0 if every_position else 1,
        )
        return output.logits[0, :, None] if flat else output.logits

    def _sample(self, logits: torch.Tensor, rows: Sequence[R], prompt_scores: bool) -> list[Sampled]:
        return sample_step(logits, rows, self._generators, prompt_scores)
