"""What both adapters' early-audio tests share (this module holds no tests).

A call's first words often arrive before its engine slot is open (a prompt's prefill, a remote
server's handshake, a busy engine). Both adapters create their core session at once and let it
keep that audio until the slot opens, so the model hears the call from its first sample. The
tests check it the same way for Pipecat and LiveKit:

- ``identity_engine``: the real ``Engine`` (worker thread, batching, stall and backlog policy)
  whose network is replaced by the identity (each step's output is its input): a fake model, so
  that what the model heard can be read back from what it says.
- ``open_late``: the engine's real ``open``, delayed (a stand-in for a slow prefill or handshake,
  which a tiny model on a CPU does not have).
- ``caller_audio`` and ``assert_heard_from_the_first_sample``: audio with no digital silence, and
  the check that the model's output is that audio from its first sample on, none of it dropped.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

OPEN_DELAY_S = 1.0
"""How late the slot opens: 8 steps, more than the engine's input backlog bound (4) holds."""


def identity_engine(model_dir, *, compute_s: float = 0.0, max_sessions: int = 2) -> Engine:
    """A real Engine whose model is replaced by the identity (a fake: see the module docstring)."""
    engine = Engine(load_model(model_dir), max_sessions=max_sessions)

    def echo(rows, active, audio, sampling, generators):
        if compute_s:
            time.sleep(compute_s)
        return audio[:rows].clone()

    engine.stepper.tick = echo  # type: ignore[method-assign]
    return engine


def open_late(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds: float = OPEN_DELAY_S):
    """Make ``engine.open`` take ``seconds`` longer (it runs on a worker thread)."""
    real_open = engine.open

    def late_open(*args, **kwargs):
        time.sleep(seconds)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(engine, "open", late_open)


def caller_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """int16 noise at -20 dBFS at the model's rate, no sample zero: the echo's start is exact."""
    rng = np.random.default_rng(seed)
    pcm = np.clip(rng.normal(0, 3000, int(seconds * SAMPLE_RATE)), -32768, 32767).astype(np.int16)
    pcm[pcm == 0] = 1
    return pcm


def assert_heard_from_the_first_sample(sent: np.ndarray, back: np.ndarray, *, min_s: float):
    """``back`` (the model's int16 output) is ``sent`` from its first sample, for ``min_s``.

    The engine may step on silence before the first input step reaches it (zeros), never after.
    """
    start = int(np.argmax(back != 0))
    assert back[start] != 0, "the model said nothing"
    n = min(len(sent), len(back) - start) // SAMPLES_PER_STEP * SAMPLES_PER_STEP
    assert n >= min_s * SAMPLE_RATE, f"only {n / SAMPLE_RATE:.2f} s came back"
    heard = back[start : start + n]
    # 2 LSB: an int16 -> float -> int16 round trip may round either way
    first = np.flatnonzero(np.abs(heard.astype(np.int32) - sent[:n]) > 2)
    step = first[0] // SAMPLES_PER_STEP if first.size else None
    assert step is None, (
        f"the model's input differs from the caller's audio from step {step} on: "
        "caller audio sent while the slot opened was lost"
    )
