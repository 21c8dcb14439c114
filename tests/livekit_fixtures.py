"""Fixtures the LiveKit plugin tests share: one engine on the tiny model, and a check that every
test gives its engine slots back."""

from __future__ import annotations

import pytest

from hertz_agents.engine import load_engine

__all__ = ["engine", "every_slot_is_given_back"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return load_engine(tiny_model_dir)


@pytest.fixture(autouse=True)
def every_slot_is_given_back(engine):
    before = engine.active_sessions
    yield
    assert engine.active_sessions == before, "the test left a session open on the engine"
