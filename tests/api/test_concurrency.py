"""32 concurrent streaming chat requests on the default model: all complete, each as if sent alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bench.process import ServerProcess

pytestmark = pytest.mark.slow

TOPICS = [
    "the sea", "a lighthouse", "bread", "winter", "a violin", "the moon", "a library", "rain", "a fox",
    "coffee", "a train", "mountains", "a garden", "the desert", "a clock", "snow", "a river", "a city at night",
    "an old map", "a kite", "thunder", "a bicycle", "the forest", "a candle", "autumn", "a market", "a bridge",
    "the stars", "a harbor", "tea", "a letter", "a window",
]  # fmt: skip
MAX_TOKENS = 24


def body(topic: str) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }


async def stream_text(client: httpx.AsyncClient, topic: str) -> tuple[str, str]:
    text, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body(topic)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_32_concurrent_streams_equal_their_alone_answers(smol_server: ServerProcess) -> None:
    async def main() -> tuple[list, list]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=smol_server.url, timeout=300, limits=limits) as client:
            alone = [await stream_text(client, topic) for topic in TOPICS]
            together = await asyncio.gather(*(stream_text(client, topic) for topic in TOPICS))
        return alone, list(together)

    alone, together = asyncio.run(main())
    assert len(together) == 32 and all(finish in ("stop", "length") for _, finish in together)
    for topic, a, t in zip(TOPICS, alone, together, strict=True):
        assert t == a, f"{topic!r}: batched {t!r} != alone {a!r}"
