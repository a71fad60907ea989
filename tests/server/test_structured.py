"""Structured output without a real model: parsing and refusals, compiling and the cache, random-logit walks
that must always end valid, bounded whitespace, and the engine on the tiny model (mixed batches, min_tokens,
max_tokens)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from models import LoadedModel
from models.sampler import make_generator, sample
from server import metrics
from server.engine import Engine
from server.errors import InvalidRequest
from server.request import FinishReason, SamplingParams
from server.grammars import Grammar, GrammarCompiler, GrammarState
from server.structured import JSON_WHITESPACE, parse
from tests.helpers import collect, generate_alone, run_with_engine


def json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def compiler(tiny: LoadedModel) -> GrammarCompiler:
    return GrammarCompiler(tiny.tokenizer, tiny.info.vocab_size, tiny.info.eos_token_ids)


def compiled(compiler: GrammarCompiler, **fields: Any) -> Grammar:
    constraint = parse(**fields)
    assert constraint is not None
    return compiler.compile_now(constraint.spec)


# ---- parsing: every bad input is a 400 naming its field ----


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}}, "response_format.json_schema.strict"),
        ({"response_format": json_schema({"enum": ["x" * 70000]})}, "response_format.json_schema.schema"),
        ({"structured_outputs": []}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
        ({"structured_outputs": {"grammar": "   "}}, "structured_outputs.grammar"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"tools": True, "response_format": {"type": "json_object"}}, "tools"),
    ],
)  # fmt: skip
def test_bad_constraints_are_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**fields)
    assert info.value.param == param, info.value.message
    assert param.split(".")[0].split("[")[0] in info.value.message


def test_free_text_is_no_constraint() -> None:
    assert parse() is None
    assert parse(response_format={"type": "text"}) is None
    assert parse(structured_outputs={"json": None, "regex": None}) is None  # all null: nothing asked for


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"response_format": json_schema({"not": {"type": "string"}})}, "not"),
        ({"response_format": json_schema({"type": "string", "format": "shoe-size"})}, "format"),
        ({"response_format": json_schema({"type": 5})}, "type"),
        ({"response_format": json_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}})}, "missing"),
        ({"response_format": json_schema({"type": "integer", "minimum": 5, "maximum": 1})}, "minimum"),
        ({"response_format": json_schema({"type": "string", "pattern": "(("})}, "regex"),
        ({"structured_outputs": {"regex": "(("}}, "regex"),
        ({"structured_outputs": {"grammar": 'start: "a" ("b"'}}, "Expected"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "undefined_rule"),
    ],
)  # fmt: skip
def test_what_the_backend_cannot_enforce_is_refused(compiler: GrammarCompiler, fields: dict, reason: str) -> None:
    constraint = parse(**fields)
    assert constraint is not None
    with pytest.raises(InvalidRequest) as info:
        compiler.compile_now(constraint.spec)
    assert info.value.param == constraint.spec.param
    assert reason in info.value.message, info.value.message


def test_the_same_schema_twice_hits_the_cache(compiler: GrammarCompiler) -> None:
    def count(result: str) -> float:
        return metrics.GRAMMAR_CACHE.labels(result)._value.get()

    schema = {"type": "object", "properties": {"cache": {"type": "integer"}}}
    hits, misses = count("hit"), count("miss")
    first = compiled(compiler, response_format=json_schema(schema))
    # The same schema with its keys in another order is the same grammar.
    again = compiled(compiler, structured_outputs={"json": json.dumps({"properties": {"cache": {"type": "integer"}}, "type": "object"})})
    assert again is first
    assert (count("hit") - hits, count("miss") - misses) == (1, 1)


def test_a_compile_over_the_time_limit_is_a_400(tiny: LoadedModel) -> None:
    slow = GrammarCompiler(tiny.tokenizer, tiny.info.vocab_size, tiny.info.eos_token_ids, timeout_s=0)
    constraint = parse(response_format={"type": "json_object"})

    async def main() -> None:
        with pytest.raises(InvalidRequest) as info:
            await slow.compile(constraint.spec)
        assert info.value.param == "response_format" and "longer than" in info.value.message

    asyncio.run(main())
    slow.close()


# ---- random-logit walks: whatever the logits, the output is valid ----


@dataclass(eq=False)
class Walk:
    """A sampler row driven by a grammar alone, as the engine drives a constrained request."""

    grammar: GrammarState
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)

    def suppressed_token_ids(self) -> tuple[int, ...]:
        return ()

    def allowed_tokens(self) -> Any:
        return self.grammar.allowed_tokens()


def walk(loaded: LoadedModel, grammar: Grammar, seed: int, max_steps: int, bias: dict[int, float] | None = None) -> tuple[str, bool]:
    """Sample from random logits (plus `bias`) under the grammar until it is complete; (text, completed)."""
    row = Walk(grammar.start())
    generator = make_generator(seed)
    noise = torch.Generator().manual_seed(seed)
    end_tokens = row.grammar.end_tokens
    for _ in range(max_steps):
        logits = torch.randn(1, loaded.info.vocab_size, generator=noise) * 3
        for token, value in (bias or {}).items():
            logits[0, token] += value
        token = int(sample(logits, [row], [generator])[0])
        complete = row.grammar.accept(token)  # raises if the sampler let a masked token through
        if token not in end_tokens:
            row.output_ids.append(token)
        if complete:
            return loaded.tokenizer.decode(row.output_ids), True
    return loaded.tokenizer.decode(row.output_ids), False


WALK_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"$ref": "#/$defs/point"}, "tag": {"type": "string", "pattern": "^[a-c]{2,3}$"}},
     "required": ["point", "tag"], "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}, "y": {"type": "integer", "minimum": 10, "maximum": 99}},
                         "required": ["x", "y"], "additionalProperties": False}}},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}, {"type": "null"}]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 3}},
                                                                                          "required": ["id"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
]  # fmt: skip


@pytest.mark.parametrize("schema", WALK_SCHEMAS, ids=[f"schema{i}" for i in range(len(WALK_SCHEMAS))])
def test_random_logit_walks_always_give_valid_json(tiny: LoadedModel, compiler: GrammarCompiler, schema: dict) -> None:
    grammar = compiled(compiler, response_format=json_schema(schema))
    completed = 0
    for seed in range(30):
        text, done = walk(tiny, grammar, seed, max_steps=400)
        if done:
            completed += 1
            jsonschema.validate(json.loads(text), schema)
    assert completed >= 25, f"only {completed} of 30 walks completed"


def test_random_logit_walks_match_a_regex_and_a_choice(tiny: LoadedModel, compiler: GrammarCompiler) -> None:
    pattern = r"[A-Z][a-z]{1,4}-\d{2,3}"
    regex = compiled(compiler, structured_outputs={"regex": pattern})
    choice = compiled(compiler, structured_outputs={"choice": ["yes", "no", "maybe so"]})
    for seed in range(30):
        text, done = walk(tiny, regex, seed, max_steps=50)
        assert done and re.fullmatch(pattern, text), text
        text, done = walk(tiny, choice, seed, max_steps=50)
        assert done and text in ("yes", "no", "maybe so"), text


def test_logits_that_prefer_whitespace_still_end_within_the_bound(tiny: LoadedModel, compiler: GrammarCompiler) -> None:
    vocab = tiny.info.vocab_size
    spaces = [t for t in range(vocab) if (s := tiny.tokenizer.decode([t])) and not s.strip()]
    assert spaces, "the tokenizer has whitespace tokens"
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
              "required": ["a"], "additionalProperties": False}  # fmt: skip
    grammar = compiled(compiler, response_format=json_schema(schema))
    # Between any two JSON tokens there is at most one gap of whitespace, and a gap is at most one newline and
    # 20 spaces (JSON_WHITESPACE); {"a": [b, b, b]} has 10 tokens, so at most 11 gaps.
    gap = re.compile(JSON_WHITESPACE)
    for seed in range(10):
        text, done = walk(tiny, grammar, seed, max_steps=400, bias={t: 20.0 for t in spaces})
        assert done, f"whitespace ran on: {text!r}"
        assert json.loads(text)["a"] is not None
        runs = re.findall(r"\s+", text)
        assert all(gap.fullmatch(run) for run in runs), runs
        assert sum(map(len, runs)) <= 11 * 21


# ---- the engine on the tiny model ----


def greedy(max_tokens: int = 24, **kwargs: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, **kwargs})


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18, 19, 20], [21, 22, 23, 24, 25]]
SCHEMA = WALK_SCHEMAS[0]


def test_free_rows_beside_constrained_rows_equal_their_alone_output(tiny: LoadedModel) -> None:
    free = [greedy(24, ignore_eos=True) for _ in PROMPTS]
    alone = generate_alone(tiny, PROMPTS, free)

    async def scenario(engine: Engine) -> tuple[list, list]:
        json_grammar = await engine.grammars.compile(parse(response_format=json_schema(SCHEMA)).spec)
        choice = await engine.grammars.compile(parse(structured_outputs={"choice": ["yes", "no"]}).spec)
        constrained = [
            engine.submit(p, greedy(64, grammar=g, seed=i, temperature=0.7 * (i % 2)))
            for i, (p, g) in enumerate(zip(PROMPTS, [json_grammar, choice] * 3))
        ]
        streams = [engine.submit(p, sp) for p, sp in zip(PROMPTS, free)]
        results = await asyncio.gather(*(collect(s) for s in [*constrained, *streams]))
        return results[: len(PROMPTS)], results[len(PROMPTS) :]

    constrained, together = run_with_engine(tiny, scenario)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for i, result in enumerate(constrained):
        assert result.error is None
        if i % 2 == 0:
            if result.finish_reason is FinishReason.STOP:
                jsonschema.validate(json.loads(result.text), SCHEMA)
        else:
            assert result.finish_reason is FinishReason.STOP and result.text in ("yes", "no")


def test_a_constrained_row_is_the_same_alone_and_in_a_batch(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine) -> tuple[list, list]:
        grammar = await engine.grammars.compile(parse(response_format=json_schema(SCHEMA)).spec)
        params = [greedy(48, grammar=grammar, seed=s, temperature=0.8) for s in range(len(PROMPTS))]
        alone = [await collect(engine.submit(p, sp)) for p, sp in zip(PROMPTS, params)]
        together = await asyncio.gather(*(collect(engine.submit(p, sp)) for p, sp in zip(PROMPTS, params)))
        return alone, together

    alone, together = run_with_engine(tiny, scenario)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_min_tokens_past_the_grammar_and_a_small_max_tokens(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine) -> list:
        choice = await engine.grammars.compile(parse(structured_outputs={"choice": ["yes", "no"]}).spec)
        number = await engine.grammars.compile(parse(structured_outputs={"regex": r"[0-9]{1,3}"}).spec)
        schema = await engine.grammars.compile(parse(response_format=json_schema(SCHEMA)).spec)
        requests = [
            engine.submit(PROMPTS[0], greedy(60, min_tokens=50, grammar=choice)),
            engine.submit(PROMPTS[1], greedy(60, min_tokens=50, grammar=number, temperature=1.0, seed=3)),
            engine.submit(PROMPTS[2], greedy(3, grammar=schema)),
            engine.submit(PROMPTS[3], greedy(1, grammar=choice, min_tokens=1)),
            engine.submit(PROMPTS[4], greedy(60, min_tokens=50, grammar=number, ignore_eos=True)),
        ]
        return await asyncio.gather(*(collect(r) for r in requests))

    results = run_with_engine(tiny, scenario)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert results[0].finish_reason is FinishReason.STOP and results[0].text in ("yes", "no")
    assert results[1].finish_reason is FinishReason.STOP and re.fullmatch(r"[0-9]{1,3}", results[1].text)
    assert results[2].finish_reason is FinishReason.LENGTH and len(results[2].token_ids) == 3
    assert results[2].text.startswith("{")
    assert results[3].finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and len(results[3].token_ids) == 1
    assert results[4].finish_reason is FinishReason.STOP and re.fullmatch(r"[0-9]{1,3}", results[4].text)


def test_the_engine_keeps_serving_after_a_grammar_fails_a_request(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A matcher that refuses a token fails its request alone, with an error; the batch goes on."""

    async def scenario(engine: Engine) -> list:
        grammar = await engine.grammars.compile(parse(structured_outputs={"regex": "[a-z]{3,6}"}).spec)
        free = engine.submit(PROMPTS[1], greedy(12, ignore_eos=True))
        broken = engine.submit(PROMPTS[0], greedy(12, grammar=grammar))
        first = await asyncio.gather(collect(broken), collect(free))
        after = await collect(engine.submit(PROMPTS[2], greedy(12, grammar=grammar)))
        return [*first, after]

    original = GrammarState.accept
    calls = {"n": 0}

    def refuse_the_second(self: GrammarState, token: int) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:  # swap the sampled token for one the grammar does not allow
            bits = np.unpackbits(self.allowed_tokens().view(np.uint8), bitorder="little")
            token = int(np.flatnonzero(bits == 0)[0])
        return original(self, token)

    monkeypatch.setattr(GrammarState, "accept", refuse_the_second)
    broken, free, after = run_with_engine(tiny, scenario)
    assert broken.finish_reason is FinishReason.ERROR and broken.error
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 12
    assert after.finish_reason is FinishReason.STOP and re.fullmatch("[a-z]{3,6}", after.text)


def test_a_tokenizer_without_a_fast_backend_refuses_structured_output_only() -> None:
    class SlowTokenizer:  # no backend_tokenizer: the engine still starts; each constrained request is a 400
        pass

    compiler = GrammarCompiler(SlowTokenizer(), 100, (2,))
    with pytest.raises(InvalidRequest) as info:
        compiler.compile_now(parse(response_format={"type": "json_object"}).spec)
    assert info.value.param == "response_format" and "fast" in info.value.message
    compiler.close()
