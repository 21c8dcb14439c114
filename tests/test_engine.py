"""The streaming engine: batched ticks, rows independent, long calls, prompt prefill reuse."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.engine.stepper import Stepper
from hertz_agents.errors import EngineFull
from hertz_agents.sampling import SamplingSettings, SamplingTensors
from hertz_agents.timing import SAMPLES_PER_STEP


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _speechlike(steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(steps * SAMPLES_PER_STEP) / 16000
    return (
        (0.2 * np.sin(2 * np.pi * (120 + 40 * np.sin(t * 3)) * t) * rng.uniform(0.5, 1, t.shape))
        .astype(np.float32)
        .reshape(steps, SAMPLES_PER_STEP)
    )


def _run_rows(
    model, inputs: list[np.ndarray], active_rows: list[int], slots: int
) -> dict[int, list[np.ndarray]]:
    """Step the given slots together (greedy sampling: identical math whatever the batch)."""
    stepper = Stepper(model, slots, context=32, keep=24)
    rows = max(active_rows) + 1
    greedy = SamplingSettings(token_temp=0, categorical_temp=0, gaussian_temp=0)
    sampling = SamplingTensors.from_settings([greedy] * rows)
    active = torch.zeros(rows, dtype=torch.bool)
    active[active_rows] = True
    generators = [torch.Generator() for _ in range(rows)]
    outputs: dict[int, list[np.ndarray]] = {r: [] for r in active_rows}
    for step in range(inputs[0].shape[0]):
        audio = torch.zeros(rows, SAMPLES_PER_STEP)
        for r in active_rows:
            audio[r] = torch.from_numpy(inputs[r][step])
        out = stepper.tick(rows, active, audio, sampling, generators)
        for r in active_rows:
            outputs[r].append(out[r].numpy().copy())
    return outputs


def test_two_sessions_batched_equal_each_alone(model):
    inputs = [_speechlike(8, 1), _speechlike(8, 2)]
    together = _run_rows(model, inputs, [0, 1], slots=2)
    alone_0 = _run_rows(model, inputs, [0], slots=2)
    alone_1 = _run_rows(model, [np.zeros_like(inputs[0]), inputs[1]], [1], slots=2)
    for a, b in zip(together[0], alone_0[0]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(together[1], alone_1[1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_inactive_rows_keep_their_state(model):
    """A row that skips a tick continues exactly as if the tick had not happened."""
    inputs = [_speechlike(6, 3), _speechlike(6, 4)]
    stepper = Stepper(model, 2, context=32, keep=24)
    table = stepper.table
    greedy = SamplingTensors.from_settings([SamplingSettings(0, 0, 0)] * 2)
    gens = [torch.Generator(), torch.Generator()]
    both = torch.ones(2, dtype=torch.bool)
    only_1 = torch.tensor([False, True])
    stepper.tick(2, both, torch.from_numpy(np.stack([inputs[0][0], inputs[1][0]])), greedy, gens)
    before = [s[0].clone() for s in table.encoder_state + table.decoder_state]
    pos = int(table.positions[0])
    stepper.tick(2, only_1, torch.from_numpy(np.stack([inputs[0][1], inputs[1][1]])), greedy, gens)
    assert int(table.positions[0]) == pos
    for a, b in zip(before, [s[0] for s in table.encoder_state + table.decoder_state]):
        assert torch.equal(a, b)


def test_cost_per_step_does_not_depend_on_call_length(model):
    """Static shapes: the tick does the same work at position 2 and near the context end."""
    from hertz_agents.benchmark import bench_ticks

    early = bench_ticks(model, 1, 3, warmup=1, start_position=2, context=64)
    late = bench_ticks(model, 1, 3, warmup=1, start_position=58, context=64)
    assert early.bytes_per_session == late.bytes_per_session  # same buffers, nothing grew


def _collect(
    engine: Engine, steps: int, feed: bool = True, timeout: float = 60.0
) -> tuple[list, object]:
    outputs: list = []
    handle = engine.open(lambda audio, info: outputs.append((audio, info)), seed=0)
    audio = _speechlike(steps, 5)
    if feed:
        for step in audio:
            handle.submit(step)
            deadline = time.monotonic() + timeout
            while (
                len(outputs) < handle.steps + 1
                and len(outputs) < steps
                and time.monotonic() < deadline
            ):
                time.sleep(0.002)
    deadline = time.monotonic() + timeout
    while len(outputs) < steps and time.monotonic() < deadline:
        time.sleep(0.01)
    return outputs, handle


@pytest.mark.parametrize("rollover", ["refill", "ring"])
def test_call_three_times_the_context_keeps_going(model, rollover):
    sink = 2 if rollover == "ring" else 0
    engine = Engine(model, max_sessions=2, context=16, keep=12, rollover=rollover, sink=sink)
    try:
        outputs, handle = _collect(engine, 48)
        assert len(outputs) == 48
        assert [info.step for _, info in outputs] == list(range(48))
        assert all(np.isfinite(a).all() and a.shape == (SAMPLES_PER_STEP,) for a, _ in outputs)
        if rollover == "refill":  # the window was re-prefilled, more than once
            assert handle.position <= engine.context and engine.rollovers >= 2
        else:  # the ring wrapped at 16 and after each lap of 14, rebased a lap back
            assert handle.position >= engine.context and engine.rollovers >= 2
        handle.close()
    finally:
        engine.close()


def test_engine_full_and_slots_are_freed(model):
    engine = Engine(model, max_sessions=2, context=16)
    try:
        a = engine.open(lambda *_: None)
        b = engine.open(lambda *_: None)
        with pytest.raises(EngineFull, match="2 session slots"):
            engine.open(lambda *_: None)
        assert engine.occupancy == 1.0
        a.close()
        c = engine.open(lambda *_: None)
        assert c.slot == a.slot
        b.close()
        c.close()
        assert engine.active_sessions == 0
    finally:
        engine.close()


def test_a_tick_waits_for_a_step_that_comes_after_its_due_time(model):
    """A real-time caller's step comes a few ms either side of its due time (one step after its
    last); a tick holds, at most the batch window, until it is there, so both calls share it."""
    engine = Engine(model, max_sessions=2, context=64, batch_window=1.0, stall_timeout=30.0)
    try:
        a = engine.open(lambda *_: None)
        b = engine.open(lambda *_: None)  # its first step is due 125 ms from now
        steps = _speechlike(2, 7)
        time.sleep(max(0.0, b.next_due - 0.05 - time.monotonic()))
        a.submit(steps[0])  # 50 ms before b's step is due
        time.sleep(max(0.0, b.next_due + 0.06 - time.monotonic()))
        b.submit(steps[1])  # 60 ms after it was due
        deadline = time.monotonic() + 10
        while sum(engine.tick_sizes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # waiting only until b's due time, a ticked alone and b after it: [1, 1]
        assert list(engine.tick_sizes) == [2]
        a.close()
        b.close()
    finally:
        engine.close()


def test_a_tick_does_not_wait_for_a_caller_long_past_due(model):
    """A muted caller (no frames at all) is more than a batch window past due: the other call's
    tick does not wait for it. Waiting would hold it the whole window (1 s here)."""
    engine = Engine(model, max_sessions=2, context=64, batch_window=1.0, stall_timeout=30.0)
    try:
        answered = []
        a = engine.open(lambda *_: answered.append(time.monotonic()))
        muted = engine.open(lambda *_: None)
        time.sleep(max(0.0, muted.next_due + 1.2 - time.monotonic()))
        submitted = time.monotonic()
        a.submit(_speechlike(1, 8)[0])
        deadline = submitted + 10
        while not answered and time.monotonic() < deadline:
            time.sleep(0.005)
        assert answered and answered[0] - submitted < 0.5, "the tick waited for the muted caller"
        assert list(engine.tick_sizes) == [1]
        a.close()
        muted.close()
    finally:
        engine.close()


def test_silent_caller_still_gets_model_audio(model):
    """With no caller input the engine steps on silence after the stall timeout, keeping time."""
    engine = Engine(model, max_sessions=1, context=64, stall_timeout=0.05)
    try:
        outputs, handle = _collect(engine, 6, feed=False, timeout=10)
        assert len(outputs) == 6
        assert all(info.silence_input for _, info in outputs)
        assert handle.metrics.snapshot()["silence_steps"] == 6
        handle.close()
    finally:
        engine.close()


def test_input_backlog_is_bounded(model):
    engine = Engine(model, max_sessions=1, context=64, max_input_backlog=3)
    try:
        engine.inject_stall(0.3)  # compute falls behind while 10 steps arrive at once
        handle = engine.open(lambda *_: None)
        for step in _speechlike(10, 6):
            handle.submit(step)
        assert handle.metrics.dropped_input_steps >= 6
        handle.close()
    finally:
        engine.close()


def test_prompt_prefill_is_computed_once_and_shared(model, tmp_path):
    from hertz_agents.audio import write_audio

    prompt = np.stack([_speechlike(6, 7).ravel(), _speechlike(6, 8).ravel()])
    path = tmp_path / "prompt.wav"
    write_audio(path, prompt, 16000)
    engine = Engine(model, max_sessions=2, context=64)
    try:
        a = engine.open(lambda *_: None, prompt=path)
        b = engine.open(lambda *_: None, prompt=path)
        assert len(engine._prompts) == 1
        assert (
            a.position == b.position == 5
        )  # 6 prompt steps: 5 prefilled, the 6th is the model's last
        for layer in range(len(engine.table.caches.ar.k)):
            keys = engine.table.caches.ar.k[layer]  # [channels, slots, heads, positions, dim]
            assert torch.equal(keys[:, 0, :, :5], keys[:, 1, :, :5])
        a.close()
        b.close()
    finally:
        engine.close()
