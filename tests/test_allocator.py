"""A CPU stepper keeps freed memory in the process (engine/allocator.py): the codec-sized buffers a
tick frees are reused by the next one instead of being faulted in from the kernel again.

Each case runs in a fresh interpreter, since the malloc setting is process-wide and one-way. The
buffers are the default model's at 32 sessions ([32, 8, 2000] float32, streamed through
concatenation, convolution and ELU as the codec does); the measure is page faults, not time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TICKS = r"""
import resource, sys, torch
import torch.nn.functional as F
from hertz_agents.checkpoint import load_model
from hertz_agents.engine.stepper import Stepper

Stepper(load_model("default", device="cpu"), 1)  # what every engine and benchmark builds
from hertz_agents.engine import allocator
x0, w = torch.randn(32, 8, 2000), torch.randn(8, 8, 7)

def tick():
    x = x0
    for _ in range(6):
        x = F.elu(F.conv1d(torch.cat([x[..., :6], x], -1), w))
    return float(x.sum())

for _ in range(3):
    tick()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    tick()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(allocator.keep_freed_memory(), (after - before) / 10)
"""


def _faults_per_tick(keep: str) -> tuple[bool, float]:
    env = {**os.environ, "HERTZ_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", TICKS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    applied, faults = done.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_a_cpu_stepper_stops_ticks_faulting_their_buffers_in_again():
    applied, kept = _faults_per_tick("1")
    default_applied, default = _faults_per_tick("0")  # the control: glibc's own behaviour
    assert applied and not default_applied
    # the control must show the problem, or this test could not tell a fix from no fix
    assert default > 1000, f"glibc alone faulted only {default:.0f} pages a tick"
    assert kept < default / 20, f"{kept:.0f} page faults a tick kept against {default:.0f}"
