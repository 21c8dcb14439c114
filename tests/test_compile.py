"""``compile=True`` compiles the whole tick (codec, transformers, sampling) as one graph per
length bucket: after the buckets are warm, 200 steps and rollovers compile nothing new."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hertz_agents.engine.stepper import Stepper

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(1500)  # tracing the whole tick takes minutes on a busy 2-core machine
@pytest.mark.parametrize("rollover", ["refill", "ring"])
def test_compiled_tick_has_no_graph_breaks_and_no_recompiles_over_200_steps_and_rollovers(
    rollover,
):
    torch._dynamo.reset()
    model = _gpu_check().random_model(_gpu_check().tiny_config(), "cpu", torch.float32)
    # The backend counts every graph dynamo hands it: a recompile or a graph break adds one.
    # (fullgraph=True also turns any graph break into an error.) Inductor would compile the
    # same graphs; the counting backend keeps the test fast. The ring's rebases (its keys and
    # positions turned back a lap) run outside the graph and must not change its inputs' shapes.
    counter = CompileCounter()
    options = {
        "context": 16,
        "keep": 12,
        "rollover": rollover,
        "sink": 2 if rollover == "ring" else 0,
    }
    stepper = Stepper(model, 2, compile=counter, **options)
    eager = Stepper(model, 2, **options)
    active = torch.ones(2, dtype=torch.bool)
    inputs = torch.randn(220, 2, 2000, generator=torch.Generator().manual_seed(0)) * 0.05
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    eager_gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for i in range(20):  # the length bucket of the tick and of the shadow fill, rollovers
        out = stepper.tick(2, active, inputs[i], None, gens)
        torch.testing.assert_close(
            out, eager.tick(2, active, inputs[i], None, eager_gens), rtol=0, atol=1e-4
        )
    assert stepper.rollovers >= 2
    warm, rollovers = counter.frame_count, stepper.rollovers
    assert warm == (2 if rollover == "refill" else 1)  # the tick (and the shadow fill), length 16
    for i in range(20, 220):
        stepper.tick(2, active, inputs[i], None, gens)
    # a refill every 4 steps per session; a ring's lap every 14, rebased after each
    assert stepper.rollovers - rollovers >= 2 * (49 if rollover == "refill" else 14)
    assert counter.frame_count == warm
