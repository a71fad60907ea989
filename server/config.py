"""The one configuration: every setting is a `--flag` and a `TOKENFERRY_*` environment variable.

A flag beats the environment, which beats the default. Validated once at start; printed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.scheduler import Budgets

ENV_PREFIX = "TOKENFERRY_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")
TOOL_CALL_FORMATS = ("auto", "hermes", "llama3_json", "mistral")  # server/tools.py's formats


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Config:
    model: str = field(default="default", metadata=_help("default (SmolLM2-135M-Instruct), tiny, a HF folder or a .gguf file"))
    served_model_name: str | None = field(default=None, metadata=_help("model id clients use (default: the model's name)"))
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=8000, metadata=_help("port to listen on"))
    device: str = field(default="auto", metadata=_help("auto (cuda when available), cpu, cuda or cuda:N"))
    dtype: str = field(default="auto", metadata=_help("auto (bfloat16 on cuda, and on a CPU with AVX512-BF16 where tokenferry's own kernels run the model; float32 otherwise), float32, bfloat16, float16"))
    quantization: str = field(default="none", metadata=_help("none (exact), int8 or int4: weight-only kernels for every Linear, CPU only"))
    max_batch_size: int = field(default=64, metadata=_help("most rows in the running batch"))
    max_batch_tokens: int = field(default=65536, metadata=_help("most rows x padded length when a request joins"))
    # 128, not 256: at 32 chat streams on int4 (prompts of 40 to 80 tokens) ITL p99 fell from 165-263 to 156-180 ms
    # and TTFT p50 from 0.36 to 0.26 s, tok/s alike (3 alternating rounds, docs/benchmarks.md).
    max_prefill_tokens: int = field(default=128, metadata=_help("most prompt tokens prefilled in one step; a longer prompt is prefilled in chunks over several steps while the others decode"))
    prefix_cache_bytes: int | None = field(default=None, metadata=_help("bytes of KV kept for prompts that start alike (None: 10 percent of free memory, at most 4 GiB; 0 disables)"))
    max_waiting: int = field(default=256, metadata=_help("most queued requests; past it requests get 429"))
    api_key: str | None = field(default=None, metadata=_help("require this bearer key on /v1 routes"))
    cors_origins: tuple[str, ...] = field(default=(), metadata=_help("comma-separated origins allowed by CORS"))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error"))
    drain_timeout: float = field(default=30.0, metadata=_help("seconds to finish in-flight requests on SIGTERM"))
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata=_help("largest request body accepted (413 past it)"))
    stall_timeout: float = field(default=300.0, metadata=_help("/health fails when a busy engine has not stepped for this many seconds"))
    allow_special_tokens: bool = field(default=False, metadata=_help("let message text spell control tokens such as <|im_start|>"))
    speculative_tokens: int = field(default=0, metadata=_help("prompt-lookup draft tokens a lone greedy stream verifies per step; 0 disables"))
    web_ui: bool = field(default=True, metadata=_help("serve the chat page at / (--no-web-ui turns it off)"))
    tool_call_format: str = field(default="auto", metadata=_help("how the model writes tool calls: auto (from its chat template), hermes, llama3_json or mistral"))

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_batch_tokens", "max_prefill_tokens", "max_waiting", "max_body_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"--prefix-cache-bytes must be at least 0, got {self.prefix_cache_bytes}")
        for name in ("drain_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.speculative_tokens < 0:
            raise ValueError(f"--speculative-tokens must be 0 or more, got {self.speculative_tokens}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise ValueError(f"--tool-call-format must be one of {', '.join(TOOL_CALL_FORMATS)}, got {self.tool_call_format!r}")
        if self.api_key == "":
            raise ValueError("--api-key must not be empty")

    @property
    def budgets(self) -> Budgets:
        return Budgets(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_waiting=self.max_waiting,
            speculative_tokens=self.speculative_tokens,
        )

    def public(self) -> dict[str, Any]:
        """The effective settings, safe to log: the API key is masked."""
        values = dataclasses.asdict(self)
        if values["api_key"]:
            values["api_key"] = "***"
        return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _parser_for(annotation: str) -> Callable[[str], Any]:
    return {
        "int": int,
        "int | None": int,
        "float": float,
        "bool": _parse_bool,
        "tuple[str, ...]": _parse_list,
    }.get(annotation, str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults stay None so the environment can fill what the command line omits."""
    for f in dataclasses.fields(Config):
        help_text = f"{f.metadata['help']} (env {_env(f.name)}; default {f.default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type == "bool":
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs.update(type=_parser_for(str(f.type)), metavar=f.name.upper())
        parser.add_argument(_flag(f.name), **kwargs)
        if f.type == "bool" and f.default is True:
            # A setting that is on by default is turned off with --no-<name>, the usual spelling.
            off = "--no-" + _flag(f.name)[2:]
            parser.add_argument(off, dest=f.name, action="store_const", const=False, help=f"same as {_flag(f.name)} false")


def from_namespace(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Build the Config from parsed flags and the environment; raises ValueError with a one-line message."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is None and _env(f.name) in environ:
            raw = environ[_env(f.name)]
            try:
                value = _parser_for(str(f.type))(raw)
            except ValueError as exc:
                raise ValueError(f"{_env(f.name)}={raw!r}: {exc}") from None
        if value is not None:
            values[f.name] = value
    return Config(**values)
