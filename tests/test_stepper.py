"""The stepper: rollover through the shadow cache, the caller-channel skip, live-context buckets."""

from __future__ import annotations

import pytest
import torch

from hertz_agents.benchmark import bench_ticks
from hertz_agents.checkpoint import load_model
from hertz_agents.engine.stepper import Stepper, bucket_for, length_buckets
from hertz_agents.sampling import SamplingSettings

GREEDY = SamplingSettings(token_temp=0, categorical_temp=0, gaussian_temp=0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _run(
    stepper: Stepper, steps: int, seed: int = 0, on_step=None, late: int = 0
) -> list[torch.Tensor]:
    """Feed random caller latents and the model's own sampled latents back, as a live call does
    (the codec, identical either way, is left out to keep the test fast on a loaded CPU).

    The last row starts ``late`` steps after the others (so the rows roll over in different
    ticks)."""
    rows = stepper.table.slots
    caller = torch.randn(steps, rows, 1, 32, generator=torch.Generator().manual_seed(seed))
    everyone = torch.ones(rows, dtype=torch.bool)
    early = everyone.clone()
    early[-1] = False
    gens = [torch.Generator().manual_seed(seed + r) for r in range(rows)]
    own = torch.zeros(rows, 1, 32)
    outputs = []
    for i in range(steps):
        if on_step is not None:
            on_step(stepper, i)
        active = early if i < late else everyone
        latents, _ = stepper.advance(torch.cat((caller[i], own), dim=-1), active, None, gens)
        own = latents[:, None, -32:]  # the model's channel is the last one computed
        outputs.append(own.clone())
    return outputs


@pytest.mark.parametrize("late", [0, 5])
def test_shadow_rollover_equals_the_one_shot_reprefill(model, late):
    """Today's rollover re-prefilled the kept window in one forward at the rollover tick; the
    shadow cache prefills it in slices over the ticks before. The output must be the same, with
    the rows in phase and with one row 5 steps behind (its slices computed in other ticks)."""
    context, keep, steps = 24, 16, 44  # rollovers at 24, 32 and 40
    shadow = Stepper(model, 2, context, keep)
    inline = Stepper(model, 2, context, keep)
    for s in (shadow, inline):
        for slot in range(2):
            s.set_sampling(slot, GREEDY)

    def reprefill_inline(stepper: Stepper, _step: int) -> None:
        t = stepper.table
        for slot in range(2):
            if stepper.position(slot) == context:  # what the engine did before the shadow cache
                tokens = torch.zeros(model.channels, dtype=torch.long)
                tokens[list(stepper.channels)] = t.last_tokens[slot]
                stepper.prefill(slot, t.history[slot, context - keep : context].clone(), tokens)
                stepper.rollovers += 1

    expected = _run(inline, steps, on_step=reprefill_inline, late=late)
    got = _run(shadow, steps, late=late)
    assert shadow.rollovers == inline.rollovers == 6 - (late > 4)
    assert shadow.position(0) == inline.position(0) == 20
    assert shadow.position(1) == inline.position(1) == 20 - late + 8 * (late > 4)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # float rounding only
    if late:
        return
    # The check can fail: a shadow that missed a chunk, or kept the wrong window, diverges.
    wrong = Stepper(model, 2, context, keep)
    for slot in range(2):
        wrong.set_sampling(slot, GREEDY)
    wrong._window_start = lambda: context - keep - 1  # type: ignore[method-assign]
    assert not torch.allclose(torch.stack(_run(wrong, steps)), torch.stack(expected), atol=1e-3)


def test_shadow_fill_runs_once_per_chunk_of_known_latents_not_every_tick(model):
    """A fill forward costs about the same for 1 or 4 positions on a CPU, so the window is filled
    a whole chunk at a time, once that many of its latents are known: before the first rollover
    one fill every ``chunk`` ticks (it ran on every tick, a third of a tick's cost each time),
    and the rollovers still find their shadow complete."""
    context, keep, rows = 24, 16, 2
    stepper = Stepper(model, rows, context, keep)
    assert stepper.chunk == 3
    calls = []

    def record(s: Stepper, _step: int) -> None:
        calls.append(s.fill_calls)

    _run(stepper, 24, on_step=record)  # up to the first rollover: the window's 16 latents
    assert stepper.rollovers == 0 and stepper.table.shadow_filled == [keep, keep]
    assert calls[-1] == 5 and stepper.fill_calls == 6  # was 15: one per tick from position 9

    def assert_no_unfinished_rollover(s: Stepper, _step: int) -> None:
        for slot in range(rows):
            if s.position(slot) == context:
                assert s.table.shadow_filled[slot] == keep

    _run(stepper, 20, seed=1, on_step=assert_no_unfinished_rollover)
    assert stepper.rollovers == rows * 3  # at positions 24 (steps 0, 8 and 16)


def test_skipping_the_caller_channel_leaves_the_model_channel_bit_identical(model):
    """A live step computes only the model's channel; computing both one after the other (as
    the original does) changes nothing for it, with random sampling (the generators are
    advanced the same way) and across two rollovers. Both channels as one batch (offline
    generation) round differently, nothing more."""
    only_model = Stepper(model, 3, 24, 16)
    both = Stepper(model, 3, 24, 16, channels=(0, 1), batch_channels=False)
    batched = Stepper(model, 3, 24, 16, channels=(0, 1))
    assert both.bytes_per_slot() > only_model.bytes_per_slot()  # its caches are skipped too
    expected = _run(both, 34, seed=5)
    assert both.rollovers == 6
    for a, b in zip(_run(only_model, 34, seed=5), expected):
        assert torch.equal(a, b)
    for a, b in zip(_run(batched, 8, seed=5), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_attention_reads_only_the_live_bucket(model):
    assert length_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert length_buckets(24) == [16, 24]
    assert bucket_for(17, length_buckets(2048)) == 32
    # A call at positions 0..5 in a 64- and a 256-position cache gives the same output: the
    # part of the cache past the live bucket is never read.
    short, long = Stepper(model, 1, 64), Stepper(model, 1, 256)
    for k in long.table.caches.ar.k + long.table.caches.resynthesizer.split.v:
        k[:, :, :, 16:] = float("nan")  # would poison any read past the first bucket
    for a, b in zip(_run(short, 6), _run(long, 6)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bench_crosses_the_context_and_counts_rollovers(model):
    result = bench_ticks(model, 2, 30, warmup=1, context=16)
    assert result.rollovers >= 2 * 3  # 31 steps from 0 with 16 positions, keep 12: at 16, 20, 24...
    assert result.step_ms_max >= result.step_ms_median > 0
    assert result.context == 16


def test_bench_command_crosses_the_context_and_reports_rollovers(tiny_model_dir):
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "hertz_agents.cli", "bench", "-m", str(tiny_model_dir), "--json"]
    run = subprocess.run(
        base + ["--sessions", "2", "--steps", "4", "--context", "16", "--position", "14"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["rollovers"] == 2 and report["context"] == 16
    assert report["step_ms_max"] >= report["step_ms_median"]
    bad = subprocess.run(base + ["--context", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--context" in bad.stderr and "Traceback" not in bad.stderr


def _greedy(stepper: Stepper) -> Stepper:
    for slot in range(stepper.table.slots):
        stepper.set_sampling(slot, GREEDY)
    return stepper


def test_a_ring_is_the_refill_until_it_wraps_and_then_holds_no_shadow(model):
    """Before the context fills, a ring cache is an ordinary cache: the same output bit for bit.
    Past it the two differ (the ring keeps the last positions at their absolute positions, the
    refill restarts at 0), the ring counts one rollover per lap, and it holds no shadow cache."""
    context, keep, steps = 24, 16, 60
    ring = _greedy(Stepper(model, 2, context, keep, rollover="ring", sink=4))
    refill = _greedy(Stepper(model, 2, context, keep))
    got, expected = _run(ring, steps), _run(refill, steps)
    for a, b in zip(got[:context], expected[:context]):
        assert torch.equal(a, b)
    assert not torch.allclose(torch.stack(got[context:]), torch.stack(expected[context:]))
    assert ring.rollovers == 2 * 2  # the context filled at 24, then a lap of 20 (sink 4) at 44
    assert ring.position(0) == steps - ring.lap  # rebased once it was a lap past the context
    assert ring.table.shadow is None and ring.bytes_per_slot() < refill.bytes_per_slot()


def test_rebasing_a_ring_changes_nothing_but_its_positions(model):
    """Turning a ring's keys and position back by a lap is a rotation: with no sink, the output
    is the one of a ring whose positions kept counting, up to float rounding. (With a sink it is
    not: the sink is then seen closer than it was.)"""
    rebased = _greedy(Stepper(model, 2, 16, rollover="ring", channels=(0, 1)))
    counting = _greedy(Stepper(model, 2, 16, rollover="ring", channels=(0, 1)))
    counting._rebase_rings = lambda rows, steps: None  # type: ignore[method-assign]
    for rotary in counting._rotaries():
        rotary.extend(200)
    got, expected = _run(rebased, 90, late=3), _run(counting, 90, late=3)
    assert counting.position(0) == 90 and rebased.position(0) < 16 + 2 * rebased.lap
    assert rebased.rollovers == counting.rollovers == 5 + 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # the check can fail: keys not turned (only positions moved back) diverge
    unturned = _greedy(Stepper(model, 2, 16, rollover="ring", channels=(0, 1)))
    unturned._rebase = lambda slot: unturned.table.set_position(  # type: ignore[method-assign]
        slot, unturned.position(slot) - unturned.lap
    )
    assert not torch.allclose(torch.stack(_run(unturned, 90, late=3)), torch.stack(expected))


def test_a_ring_chunk_that_would_wrap_is_fed_one_position_at_a_time(model):
    """Feeding several latents at once into a full ring would let a position see keys written
    after it (they overwrite the ones it should see), so such a chunk is fed step by step: the
    same as feeding it one latent at a time."""
    latents = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(3))
    one = torch.ones(1, dtype=torch.bool)
    chunked = _greedy(Stepper(model, 1, 24, 16, rollover="ring", channels=(0, 1)))
    single = _greedy(Stepper(model, 1, 24, 16, rollover="ring", channels=(0, 1)))
    got, _ = chunked.advance(latents, one)
    for i in range(30):
        expected, _ = single.advance(latents[:, i : i + 1], one)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert chunked.position(0) == single.position(0) == 30


def test_bench_measures_a_ring_far_past_the_context(model):
    result = bench_ticks(model, 2, 12, warmup=1, context=16, start_position=100, rollover="ring")
    assert result.rollover == "ring" and result.start_position == 100
    assert result.rollovers == 2  # a lap of 16 ends at position 112
    refill = bench_ticks(model, 2, 4, warmup=1, context=16)
    assert result.bytes_per_session < refill.bytes_per_session  # no shadow cache
    with pytest.raises(ValueError, match="start position"):
        bench_ticks(model, 1, 2, context=16, start_position=100)
