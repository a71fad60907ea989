"""`python -m server generate` streams an answer from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server", "generate", *args, "--log-level", "warning"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_generate_with_the_tiny_model() -> None:
    done = generate("Hello there", "--model", "tiny", "--max-tokens", "8", "--raw")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_generate_refuses_bad_sampling_values() -> None:
    done = generate("Hello", "--model", "tiny", "--temperature", "-1")
    assert done.returncode == 2 and "temperature" in done.stderr


@pytest.mark.slow
def test_generate_with_the_default_model() -> None:
    done = generate("What is the capital of France? Answer in one sentence.", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
