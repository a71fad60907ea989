"""The official `openai` package, sync and async, streaming and not, against a real server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from bench.process import ServerProcess

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the ferry."}]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(tiny_server: ServerProcess) -> None:
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client(tiny_server).models.retrieve("tiny").id == "tiny"


def test_chat_completion(tiny_server: ServerProcess) -> None:
    answer = client(tiny_server).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_chat_streaming_equals_non_streaming(tiny_server: ServerProcess) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 20, "temperature": 0, "seed": 1}
    whole = client(tiny_server).chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    chunks = list(
        client(tiny_server).chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_completions_with_several_prompts_and_choices(tiny_server: ServerProcess) -> None:
    answer = client(tiny_server).completions.create(
        model="tiny", prompt=["Once upon a time", "The quick brown fox"], n=2, max_tokens=6,
        temperature=1.0, seed=5, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert answer.object == "text_completion"
    assert sorted(c.index for c in answer.choices) == [0, 1, 2, 3]
    assert answer.usage.completion_tokens == 24
    assert answer.choices[0].text != answer.choices[1].text, "two sampled choices of one prompt should differ"


def test_completions_accept_token_ids(tiny_server: ServerProcess) -> None:
    answer = client(tiny_server).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert answer.usage.prompt_tokens == 3 and answer.usage.completion_tokens == 3


def test_async_client_streams_chat_and_completions(tiny_server: ServerProcess) -> None:
    async def main() -> tuple[str, str]:
        api = async_client(tiny_server)
        chat = await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        chat_text = "".join([c.choices[0].delta.content or "" async for c in chat if c.choices])
        completion = await api.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        completion_text = "".join([c.choices[0].text async for c in completion])
        await api.close()
        return chat_text, completion_text

    chat_text, completion_text = asyncio.run(main())
    assert chat_text and completion_text


def test_errors_surface_as_openai_exceptions(tiny_server: ServerProcess) -> None:
    api = client(tiny_server)
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.completions.create(model="tiny", prompt="word " * 2000, max_tokens=5)
    assert too_long.value.code == "context_length_exceeded"


@pytest.mark.slow
def test_the_default_model_answers_through_the_client(smol_server: ServerProcess) -> None:
    answer = client(smol_server).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24, temperature=0,
    )  # fmt: skip
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
