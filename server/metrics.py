"""Prometheus metrics, all named `tokenferry_*`, defined in this one place; and three of them again under
the names vLLM gives them, which gateways read (the model server protocol, below).

Latency buckets span a GPU's milliseconds and a CPU's tens of seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip

REQUESTS = Counter(
    "tokenferry_requests_total",
    "Requests by route and outcome (stop, length, cancelled, error, rejected).",
    ["route", "outcome"],
)
WAITING = Gauge("tokenferry_waiting_requests", "Requests queued and not yet running.")
RUNNING = Gauge("tokenferry_running_requests", "Rows in the running batch.")
KV_USAGE = Gauge(
    "tokenferry_batch_kv_usage_ratio",
    "Share of --max-batch-tokens the running batch holds (rows x padded length, as admission counts it), 0 to 1.",
)
PADDING_RATIO = Gauge(
    "tokenferry_batch_padding_ratio", "Share of the running batch's padded window that is padding."
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tokenferry_time_to_first_token_seconds", "From arrival to the first token.", buckets=LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "tokenferry_inter_token_latency_seconds", "Between consecutive tokens of a request.", buckets=LATENCY_BUCKETS
)
E2E_LATENCY = Histogram(
    "tokenferry_e2e_request_latency_seconds", "From arrival to the last token.", buckets=LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "tokenferry_queue_time_seconds", "From arrival to joining the running batch.", buckets=LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("tokenferry_prompt_tokens_total", "Prompt tokens of requests that started prefilling.")
GENERATED_TOKENS = Counter("tokenferry_generation_tokens_total", "Tokens generated.")
STEP_TIME = Histogram(
    "tokenferry_step_duration_seconds", "One model step, by phase.", ["phase"], buckets=LATENCY_BUCKETS
)
SPECULATIVE_TOKENS = Counter(
    "tokenferry_speculative_tokens_total",
    "Prompt-lookup draft tokens verified, by result: drafted (all), accepted (kept as output).",
    ["result"],
)
GRAMMAR_CACHE = Counter(
    "tokenferry_grammar_cache_total", "Compiled-grammar cache lookups for structured output, by result (hit, miss).", ["result"]
)
GRAMMAR_COMPILE_TIME = Histogram(
    "tokenferry_grammar_compile_seconds", "Compiling one grammar (a cache miss), off the engine thread.", buckets=LATENCY_BUCKETS
)
GRAMMAR_MASK_TIME = Summary(
    "tokenferry_grammar_mask_seconds", "Computing one constrained row's allowed-token mask for one step."
)
PREFILL_TOKENS = Counter(
    "tokenferry_prefill_computed_tokens_total", "Prompt tokens computed by a prefill (not read from the prefix cache)."
)
PREFIX_CACHE_HITS = Counter("tokenferry_prefix_cache_hits_total", "Requests that reused cached prompt tokens.")
PREFIX_CACHED_TOKENS = Counter(
    "tokenferry_prefix_cache_reused_tokens_total", "Prompt tokens read from the prefix cache instead of computed."
)
KV_STORE_BYTES = Gauge(
    "tokenferry_kv_store_bytes", "Bytes of KV storage allocated for the running batch and prompts read in chunks."
)
PREFIX_CACHE_BYTES = Gauge("tokenferry_prefix_cache_bytes", "Bytes of KV blocks held in the prefix cache.")
PREFIX_CACHE_CAPACITY = Gauge(
    "tokenferry_prefix_cache_capacity_bytes", "Bytes of KV blocks the prefix cache may hold (its bound, in whole blocks)."
)
PREFIX_CACHE_EVICTIONS = Counter(
    "tokenferry_prefix_cache_evictions_total", "Blocks evicted from the prefix cache to make room."
)


class ModelServerProtocol(Collector):
    """`vllm:num_requests_waiting`, `vllm:num_requests_running` and `vllm:kv_cache_usage_perc`, read from the
    gauges above at scrape time: the metrics the Gateway API Inference Extension's endpoint picker (and
    dashboards written for vLLM) read from a model server. Labelled `model_name` as vLLM labels them, and
    absent until `serve` names the model.

    The meanings match where the engines differ: vLLM counts KV blocks in use of its pool (cached blocks
    nobody uses are free), tokenferry the running batch's share of its token budget (the prefix cache is a
    cache: it evicts to make room, so it is free in the same sense).
    """

    ALIASES = {
        "vllm:num_requests_waiting": WAITING,
        "vllm:num_requests_running": RUNNING,
        "vllm:kv_cache_usage_perc": KV_USAGE,
    }

    def __init__(self) -> None:
        self.model_name: str | None = None

    def serve(self, model_name: str) -> None:
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        if self.model_name is None:
            return
        for name, gauge in self.ALIASES.items():
            (source,) = gauge.collect()
            family = GaugeMetricFamily(name, f"{source.documentation} (tokenferry: {source.name})", labels=["model_name"])
            family.add_metric([self.model_name], source.samples[0].value)
            yield family


MODEL_SERVER_PROTOCOL = ModelServerProtocol()
REGISTRY.register(MODEL_SERVER_PROTOCOL)
