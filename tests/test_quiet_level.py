"""The model's quiet level: measured on a real tiny engine, once per engine, and None where it
cannot be measured (no free slot, a closed engine, a remote engine) so that gates fall back."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hertz_agents.audio import rms
from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine, measure_quiet_level
from hertz_agents.engine.quiet import QUIET_MEASURE_STEPS, QUIET_WINDOW_STEPS
from hertz_agents.remote.client import RemoteEngine
from hertz_agents.timing import SAMPLES_PER_STEP


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def engine(model):
    engine = Engine(model, max_sessions=2, context=64)
    yield engine
    engine.close()


def _levels_on_silence(engine: Engine, steps: int, seed: int) -> list[float]:
    """The RMS of each output step of a fresh slot fed ``steps`` steps of silence."""
    levels: list[float] = []
    done = threading.Event()
    silence = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)

    def on_output(audio: np.ndarray, info) -> None:
        levels.append(rms(audio))
        if len(levels) >= steps:
            done.set()

    handle = engine.open(on_output, seed=seed)
    for _ in range(steps):
        handle.submit(silence)
    assert done.wait(60)
    handle.close()
    return levels[:steps]


def test_the_level_is_the_quietest_half_second_of_the_models_output_on_silence(engine):
    level = measure_quiet_level(engine, seed=3)
    levels = np.asarray(_levels_on_silence(engine, QUIET_MEASURE_STEPS, seed=3))
    windows = [
        levels[i : i + QUIET_WINDOW_STEPS].mean()
        for i in range(len(levels) - QUIET_WINDOW_STEPS + 1)
    ]
    assert level is not None and level > 0
    assert level == pytest.approx(min(windows), rel=1e-5)
    assert level <= levels.mean()
    assert engine.active_sessions == 0, "the measuring slot is given back"


def test_the_level_is_measured_once_per_engine(engine, monkeypatch):
    opens = []
    real_open = engine.open

    def counting_open(*args, **kwargs):
        opens.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(engine, "open", counting_open)
    results: list[float | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(measure_quiet_level(engine)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(opens) == 1, "concurrent first calls share one measurement"
    assert len(results) == 3 and results[0] is not None and len(set(results)) == 1
    assert measure_quiet_level(engine, steps=4, seed=9) == results[0], (
        "later calls get the cached level"
    )
    assert len(opens) == 1


def test_a_full_engine_gives_none_and_a_later_call_measures(model):
    engine = Engine(model, max_sessions=1, context=64)
    try:
        taken = engine.open(lambda *_: None)
        assert measure_quiet_level(engine) is None
        taken.close()
        assert measure_quiet_level(engine) is not None, "a failure is not cached"
    finally:
        engine.close()


def test_a_closed_engine_gives_none(model):
    engine = Engine(model, max_sessions=1, context=64)
    engine.close()
    assert measure_quiet_level(engine) is None


def test_a_remote_engine_is_not_measured():
    # An unconnected stand-in: a real one would need a running server, and measuring must not
    # touch it at all (it would take a slot of a shared server), so any use would fail here.
    remote = RemoteEngine.__new__(RemoteEngine)
    assert measure_quiet_level(remote) is None
