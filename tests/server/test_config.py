"""Configuration: flags beat environment variables beat defaults; bad values are one line and exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from server.config import Config, add_arguments, from_namespace


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), environ or {})


def test_defaults() -> None:
    config = parse([])
    assert (config.model, config.host, config.port, config.max_batch_size) == ("default", "127.0.0.1", 8000, 64)
    assert config.cors_origins == () and config.api_key is None


def test_flags_beat_environment_beats_defaults() -> None:
    environ = {"TOKENFERRY_PORT": "9000", "TOKENFERRY_MAX_WAITING": "7", "TOKENFERRY_CORS_ORIGINS": "http://a, http://b"}
    config = parse(["--port", "9100", "--allow-special-tokens"], environ)
    assert config.port == 9100 and config.max_waiting == 7
    assert config.cors_origins == ("http://a", "http://b") and config.allow_special_tokens is True
    assert parse([], {"TOKENFERRY_ALLOW_SPECIAL_TOKENS": "false"}).allow_special_tokens is False
    assert parse([]).quantization == "none"
    assert parse(["--quantization", "int4"], {"TOKENFERRY_QUANTIZATION": "int8"}).quantization == "int4"


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size must be at least 1"),
        (["--port", "70000"], {}, "--port"),
        (["--log-level", "loud"], {}, "--log-level"),
        (["--dtype", "int4"], {}, "--dtype"),
        (["--quantization", "int3"], {}, "--quantization must be one of none, int8, int4"),
        ([], {"TOKENFERRY_PORT": "eighty"}, "TOKENFERRY_PORT"),
    ],
)
def test_bad_values_are_rejected(argv: list[str], environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse(argv, environ)


def test_the_api_key_is_never_printed() -> None:
    assert parse(["--api-key", "s3cret"]).public()["api_key"] == "***"


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--port", "x"], ["--no-such-flag"]])
def test_the_command_line_exits_2_with_one_line(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "server", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("tokenferry")
