"""Shared fixtures: the tiny model (fast, random weights) and the real default model (SmolLM2-135M)."""

from __future__ import annotations

import pytest

from models import LoadedModel, load


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load("tiny")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return load("default")
