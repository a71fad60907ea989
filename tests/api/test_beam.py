"""Beam search through the API (tiny model, in process): the n best sequences of one search, with their scores."""

from __future__ import annotations

import asyncio

import httpx

from models import LoadedModel
from server.app import create_app
from server.config import Config
from server.engine import Engine
from server.request import SamplingParams
from tests.api.test_errors import assert_error
from tests.helpers import collect

PROMPT = [5, 6, 7, 8, 9]


def run(loaded: LoadedModel, scenario, **config: object):
    async def main():
        settings = Config(model="tiny", **config)
        engine = Engine(loaded, settings.budgets)
        engine.start()
        app = create_app(settings, engine)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await scenario(engine, client)
        finally:
            await engine.shutdown(drain=False)

    return asyncio.run(main())


def test_completions_return_the_searchs_n_best_with_their_tokens_and_scores(tiny: LoadedModel) -> None:
    body = {
        "prompt": PROMPT, "max_tokens": 10, "use_beam_search": True, "n": 2, "best_of": 3, "length_penalty": 0.5,
        "early_stopping": "never", "logprobs": 1, "return_tokens_as_token_ids": True,
    }  # fmt: skip

    async def scenario(engine: Engine, client: httpx.AsyncClient):
        response = await client.post("/v1/completions", json=body)
        params = SamplingParams(
            max_tokens=10, temperature=0.0, beam_width=3, beam_returns=2, length_penalty=0.5, early_stopping="never", logprobs=1
        )
        return response, await collect(engine.submit(PROMPT, params))

    response, direct = run(tiny, scenario)
    assert response.status_code == 200, response.text
    answer = response.json()
    beams = direct.events[-1].beams
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for choice, beam in zip(answer["choices"], beams, strict=True):
        assert choice["text"] == beam.text
        assert choice["finish_reason"] == str(beam.finish_reason)
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert tokens == list(beam.token_ids)
        assert choice["logprobs"]["token_logprobs"] == [s.logprobs.logprob for s in beam.logprobs]
    assert answer["usage"]["completion_tokens"] == sum(len(b.token_ids) for b in beams)


def test_chat_beam_search_without_scores(tiny: LoadedModel) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "use_beam_search": True, "n": 3}

    async def scenario(engine: Engine, client: httpx.AsyncClient):
        return await client.post("/v1/chat/completions", json=body)

    answer = run(tiny, scenario).json()
    assert len(answer["choices"]) == 3
    assert all(c["logprobs"] is None and c["finish_reason"] in ("stop", "length") for c in answer["choices"])


def test_a_beam_wider_than_the_batch_is_400_naming_the_width(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine, client: httpx.AsyncClient):
        common = {"prompt": "hi", "max_tokens": 4, "use_beam_search": True}
        return (
            await client.post("/v1/completions", json={**common, "n": 3}),
            await client.post("/v1/completions", json={**common, "n": 1, "best_of": 4}),
        )

    by_n, by_best_of = run(tiny, scenario, max_batch_size=2)
    assert "batch size" in assert_error(by_n, 400, param="n")["message"]
    assert_error(by_best_of, 400, param="best_of")
