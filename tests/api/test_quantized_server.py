"""A server started with --quantization says so in its load log and in /v1/models, answers, and scores
on the lm-eval tasks as float32 does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.process import ServerProcess
from models.loader import converted_gguf, default_gguf
from tests.api import test_lm_eval
from tests.api.test_lm_eval import evaluate

task_dir = test_lm_eval.task_dir  # the offline lm-eval tasks' fixture, shared


@pytest.fixture(scope="module")
def int8_server(server_logs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model", "tiny", "--quantization", "int8", log_dir=server_logs).wait_ready()
    yield server
    server.terminate()


def test_the_mode_is_in_the_load_log_and_the_model_card(int8_server: ServerProcess, tiny_server: ServerProcess) -> None:
    card = httpx.get(f"{int8_server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["quantization"] == "int8"
    assert httpx.get(f"{tiny_server.url}/v1/models/tiny", timeout=30).json()["quantization"] == "none"
    logs = int8_server.logs()
    assert '"quantized"' in logs and '"quantization": "int8"' in logs, logs[-2000:]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    answer = httpx.post(f"{int8_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_int4_scores_within_two_points_of_float32(smol_server: ServerProcess, task_dir: Path, server_logs: Path) -> None:
    """The lm-eval tasks of test_lm_eval, served in float32 and in int4: accuracy within 2 points.

    Measured: the same accuracy in every mode (last word 0.667, choice 0.70), perplexity of the last word
    4.099 in float32, 4.118 in int8, 4.132 in int4.
    """
    folder = converted_gguf(default_gguf())
    args = "model=SmolLM2-135M-Instruct,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
    args += f"tokenizer={folder},tokenized_requests=True,num_concurrent=4,max_retries=1"
    reference = evaluate("local-completions", args.format(url=smol_server.url), task_dir)
    server = ServerProcess("--log-level", "warning", "--quantization", "int4", log_dir=server_logs).wait_ready()
    try:
        quantized = evaluate("local-completions", args.format(url=server.url), task_dir)
    finally:
        server.terminate()
    for task, metrics in reference.items():
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                assert abs(quantized[task][metric] - metrics[metric]) <= 0.02, (task, metric, quantized[task], metrics)
