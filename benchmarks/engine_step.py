"""Engine step cost against the original live loop's, measured side by side in one run.

Configuration from issue 3: the official-size codec with a small AR (dim 512, 8 layers) and
resynthesizer (dim 512, 4 layers), random weights (timing does not depend on them), float32 on
the CPU. Three things are timed, interleaved round by round so machine noise hits them alike:

* ``ours@50`` / ``ours@1500``: one engine tick of one session at context position 50 and 1500;
* ``original``: the work the original live loop does per step: encode a 6 s stereo window
  (both channels), one cached AR + resynthesizer step, decode a 6 s window of the model's
  channel (its cache scan and copy are left out, which flatters it).

    python benchmarks/engine_step.py --rounds 5 --threads 2 [--json out.json]

The stepper keeps freed memory in the process (engine/allocator.py), which then also speeds up
the original's work: ``HERTZ_KEEP_FREED_MEMORY=0`` times both on glibc's own malloc, as the
original runs on its own. The JSON says which.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from hertz_agents.config import HertzConfig, QuantizerConfig, ResynthesizerConfig, TransformerConfig
from hertz_agents.engine.allocator import keep_freed_memory
from hertz_agents.engine.stepper import Stepper
from hertz_agents.model.hertz import HertzModel
from hertz_agents.sampling import SamplingSettings, SamplingTensors
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

WINDOW_SECONDS = 6  # the original's audio and latent caches


def issue_config() -> HertzConfig:
    return HertzConfig(
        split=True,
        ar=TransformerConfig(dim=512, layers=8, heads=8, seq_len=2048),
        resynthesizer=ResynthesizerConfig(
            dim=512, layers=4, heads=8, kv_heads=8, ff_dim=None, seq_len=2048
        ),
        quantizer=QuantizerConfig(dim=256, ff_dim=512),
    )


@torch.no_grad()
def time_ours(model: HertzModel, position: int, steps: int) -> list[float]:
    stepper = Stepper(model, 1, 2048, 1024)
    stepper.jump_to(0, position)
    active = torch.ones(1, dtype=torch.bool)
    gens = [torch.Generator().manual_seed(0)]
    times = []
    for _ in range(steps + 1):  # the first step warms up kernels and is not counted
        audio = torch.randn(1, SAMPLES_PER_STEP) * 0.1
        start = time.perf_counter()
        stepper.tick(1, active, audio, None, gens)
        times.append(time.perf_counter() - start)
    return times[1:]


@torch.no_grad()
def time_original(model: HertzModel, steps: int) -> list[float]:
    codec = model.codec
    caches = model.new_caches(1, 2048, "cpu", torch.float32)
    sampling = SamplingTensors.from_settings([SamplingSettings()])
    window = torch.randn(2, 1, WINDOW_SECONDS * SAMPLE_RATE) * 0.1
    latents = torch.randn(1, WINDOW_SECONDS * SAMPLE_RATE // SAMPLES_PER_STEP, 32)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        encoded = codec.encode(window)  # both channels, the whole 6 s window, every step
        x = encoded[:, -1].reshape(1, 1, -1)
        model.next_latents(x, torch.tensor([[50 + i]]), caches, None, sampling)
        codec.decode(latents)  # the model channel's whole 6 s latent window, every step
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per round per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HertzModel(issue_config()).eval()
    samples: dict[str, list[float]] = {"ours@50": [], "ours@1500": [], "original": []}
    for r in range(args.rounds):
        samples["ours@50"] += time_ours(model, 50, args.steps)
        samples["ours@1500"] += time_ours(model, 1500, args.steps)
        samples["original"] += time_original(model, max(1, args.steps // 2))
        medians = ", ".join(f"{k} {np.median(v) * 1000:.0f} ms" for k, v in samples.items())
        print(f"round {r + 1}/{args.rounds}: {medians}")
    med = {k: float(np.median(v) * 1000) for k, v in samples.items()}
    result = {
        "median_ms": med,
        "speedup_vs_original": med["original"] / med["ours@50"],
        "position_1500_over_50": med["ours@1500"] / med["ours@50"],
        "threads": args.threads,
        "keep_freed_memory": keep_freed_memory(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
