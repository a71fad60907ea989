"""/metrics parses with prometheus_client's own parser, and its counters move as requests are made."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.process import ServerProcess

EXPECTED = {
    "tokenferry_requests": "counter",
    "tokenferry_waiting_requests": "gauge",
    "tokenferry_running_requests": "gauge",
    "tokenferry_batch_padding_ratio": "gauge",
    "tokenferry_time_to_first_token_seconds": "histogram",
    "tokenferry_inter_token_latency_seconds": "histogram",
    "tokenferry_e2e_request_latency_seconds": "histogram",
    "tokenferry_queue_time_seconds": "histogram",
    "tokenferry_prompt_tokens": "counter",
    "tokenferry_generation_tokens": "counter",
    "tokenferry_step_duration_seconds": "histogram",
    "tokenferry_prefill_computed_tokens": "counter",
    "tokenferry_prefix_cache_hits": "counter",
    "tokenferry_prefix_cache_reused_tokens": "counter",
    "tokenferry_prefix_cache_bytes": "gauge",
    "tokenferry_prefix_cache_capacity_bytes": "gauge",
    "tokenferry_prefix_cache_evictions": "counter",
    "tokenferry_kv_store_bytes": "gauge",
}


def scrape(server: ServerProcess) -> dict[str, dict[tuple, float]]:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name in EXPECTED:
            assert family.type == EXPECTED[family.name], family.name
        for s in family.samples:
            values.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return values


def total(values: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return sum(v for key, v in values.get(name, {}).items() if all((k, labels[k]) in key for k in labels))


def test_metrics_parse_and_move(tiny_server: ServerProcess) -> None:
    before = scrape(tiny_server)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        assert httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{tiny_server.url}/v1/chat/completions", json={**body, "model": "nope"}, timeout=60).status_code == 404
    after = scrape(tiny_server)
    assert set(EXPECTED) <= {name.removesuffix("_total").removesuffix("_count") for name in after} | set(EXPECTED)
    route = "/v1/chat/completions"
    assert total(after, "tokenferry_requests_total", route=route, outcome="length") - total(before, "tokenferry_requests_total", route=route, outcome="length") == 3
    assert total(after, "tokenferry_requests_total", route=route, outcome="rejected") - total(before, "tokenferry_requests_total", route=route, outcome="rejected") == 1
    assert total(after, "tokenferry_generation_tokens_total") - total(before, "tokenferry_generation_tokens_total") == 21
    assert total(after, "tokenferry_time_to_first_token_seconds_count") - total(before, "tokenferry_time_to_first_token_seconds_count") == 3
    assert total(after, "tokenferry_inter_token_latency_seconds_count") - total(before, "tokenferry_inter_token_latency_seconds_count") == 18
    assert total(after, "tokenferry_e2e_request_latency_seconds_count") - total(before, "tokenferry_e2e_request_latency_seconds_count") == 3
    assert total(after, "tokenferry_prompt_tokens_total") > total(before, "tokenferry_prompt_tokens_total")
    # The three requests share their prompt: the second and third read it from the prefix cache, so only the
    # first computes its whole prompt.
    prompt = (total(after, "tokenferry_prompt_tokens_total") - total(before, "tokenferry_prompt_tokens_total")) / 3
    computed = total(after, "tokenferry_prefill_computed_tokens_total") - total(before, "tokenferry_prefill_computed_tokens_total")
    reused = total(after, "tokenferry_prefix_cache_reused_tokens_total") - total(before, "tokenferry_prefix_cache_reused_tokens_total")
    assert computed + reused == 3 * prompt and computed < 3 * prompt
    assert 0 < total(after, "tokenferry_prefix_cache_bytes") <= total(after, "tokenferry_prefix_cache_capacity_bytes") <= 4 << 30
    assert total(after, "tokenferry_step_duration_seconds_count", phase="decode") > total(before, "tokenferry_step_duration_seconds_count", phase="decode")
    assert total(after, "tokenferry_waiting_requests") == 0 and total(after, "tokenferry_running_requests") == 0
    # The batch's KV storage is allocated while rows run and released once the batch is empty (at the step
    # that retires the last row, which may come just after the last answer went out).
    deadline = time.monotonic() + 10
    while total(scrape(tiny_server), "tokenferry_kv_store_bytes") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert total(scrape(tiny_server), "tokenferry_kv_store_bytes") == 0
