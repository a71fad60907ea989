"""What gateways read from a replica: SGLang's /server_info and /model_info, and vLLM's metric names."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from bench.process import ServerProcess, metric_total
from models import load
from server.config import Config
from tests.api.test_errors import in_process

ALIASES = {
    "vllm:num_requests_waiting": "tokenferry_waiting_requests",
    "vllm:num_requests_running": "tokenferry_running_requests",
    "vllm:kv_cache_usage_perc": "tokenferry_batch_kv_usage_ratio",
}


def test_while_loading_server_info_names_the_model_and_model_info_waits() -> None:
    async def main() -> None:
        for config, name in ((Config(model="tiny"), "tiny"), (Config(model="default", served_model_name="smol"), "smol")):
            client, _ = in_process(config)  # no lifespan: the model never finishes loading
            async with client:
                info = (await client.get("/server_info")).json()
                assert info["served_model_name"] == name and info["loaded"] is False
                assert info["model_path"] is None and info["context_length"] is None
                assert info["max_running_requests"] == config.max_batch_size
                assert (await client.get("/model_info")).status_code == 503
        # The name a spec is served under is known before it loads, and is the loaded model's name.
        client, _ = in_process(Config(model="default"))
        async with client:
            assert (await client.get("/server_info")).json()["served_model_name"] == "SmolLM2-135M-Instruct"

    asyncio.run(main())


def test_loaded_the_routes_describe_the_model_under_both_names(tiny_server: ServerProcess) -> None:
    server_info = httpx.get(f"{tiny_server.url}/server_info", timeout=10).json()
    assert httpx.get(f"{tiny_server.url}/get_server_info", timeout=10).json() == server_info
    assert server_info["served_model_name"] == "tiny" and server_info["loaded"] is True
    assert server_info["model_path"] == "tiny" and server_info["tokenizer_path"] is None
    # `--dtype auto`: bfloat16 on a CPU with AVX512-BF16 where the native kernels take the model, else float32.
    assert server_info["context_length"] == 1024 and server_info["dtype"] == load("tiny").info.dtype
    defaults = Config()
    assert (server_info["max_running_requests"], server_info["max_total_tokens"]) == (defaults.max_batch_size, defaults.max_batch_tokens)
    model_info = httpx.get(f"{tiny_server.url}/model_info", timeout=10).json()
    assert httpx.get(f"{tiny_server.url}/get_model_info", timeout=10).json() == model_info
    assert model_info == {"model_path": "tiny", "tokenizer_path": None, "is_generation": True, "model_type": "llama", "architectures": []}


def aliases_agree(text: str) -> dict[str, float]:
    """The vLLM-named gauges, each checked against the tokenferry_* gauge it mirrors."""
    values = {}
    for alias, source in ALIASES.items():
        values[alias] = metric_total(text, alias, model_name="tiny")
        assert values[alias] == metric_total(text, source), (alias, text)
    return values


def test_the_model_server_protocol_metrics_follow_the_engine(tiny_server: ServerProcess) -> None:
    idle = aliases_agree(tiny_server.metrics())
    assert idle == dict.fromkeys(ALIASES, 0.0)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 100}], "max_tokens": 600, "ignore_eos": True, "stream": True}
    started, seen = threading.Event(), []

    def stream() -> None:
        with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=120) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 5:  # tokens are flowing (the first chunk, the role, can leave before the row runs)
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    seen.append(aliases_agree(tiny_server.metrics()))
    (load,) = httpx.get(f"{tiny_server.url}/get_load", timeout=10).json()
    thread.join(120)
    deadline = time.monotonic() + 10  # the gauges are set by the step after the one that ended the stream
    while any((after := aliases_agree(tiny_server.metrics())).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = seen[0]
    # One row of a few hundred tokens: a small share of the default budget, but not none.
    assert busy["vllm:num_requests_running"] == 1 and 0 < busy["vllm:kv_cache_usage_perc"] < 0.05, busy
    assert after == dict.fromkeys(ALIASES, 0.0), after
    # SGLang's load, as its gateway's power_of_two policy reads it: the same row, in tokens.
    assert load["dp_rank"] == 0 and load["num_reqs"] == 1 and load["num_waiting_reqs"] == 0
    assert 200 < load["num_tokens"] < 1024, load
