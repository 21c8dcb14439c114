"""What one 125 ms step of a model costs on this machine, per session.

One step of one duplex session is: encode the caller's 2000 new samples (``encode_step``), one
cached AR step, one cached resynthesizer step, and decode the model's one new latent
(``decode_step``). This module times exactly that, for a batch of sessions stepped together,
so a model's size can be chosen for a CPU budget before training it.

    python -m hertz_agents.train.bench --model ckpt/hertz-small --batch 1 8 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hertz_agents.engine.stepper import Stepper
from hertz_agents.model.hertz import HertzModel
from hertz_agents.timing import SAMPLES_PER_STEP


@dataclass(frozen=True)
class StepCost:
    """Median milliseconds of each part of one step, for ``batch`` sessions at once."""

    batch: int
    threads: int
    encode_ms: float
    transformers_ms: float
    decode_ms: float

    @property
    def total_ms(self) -> float:
        """Milliseconds one step takes for the whole batch: encode, transformers and decode."""
        return self.encode_ms + self.transformers_ms + self.decode_ms

    @property
    def per_session_ms(self) -> float:
        """Milliseconds one step takes per session."""
        return self.total_ms / self.batch

    def as_dict(self) -> dict[str, float]:
        """Return the costs as a dict for JSON, times rounded to the microsecond."""
        return {
            "batch": self.batch,
            "threads": self.threads,
            "encode_ms": round(self.encode_ms, 3),
            "transformers_ms": round(self.transformers_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "per_session_ms": round(self.per_session_ms, 3),
        }


@torch.inference_mode()
def measure_step(
    net: HertzModel, batch: int = 1, steps: int = 40, warmup: int = 8, context: int = 64
) -> StepCost:
    """Time ``steps`` streaming steps of ``batch`` sessions after ``context`` steps of history.

    The transformers run through the engine's :class:`~hertz_agents.engine.stepper.Stepper`
    (only the channels a live step uses; attention over the live context), with caches of
    ``4 * context`` positions.
    """
    net = net.eval()
    codec = net.codec
    param = next(net.parameters())
    enc_state = codec.initial_encoder_state(batch)
    dec_state = codec.initial_decoder_state(batch)
    stepper = Stepper(net, batch, 4 * context)
    active = torch.ones(batch, dtype=torch.bool)
    latents = torch.randn(batch, context, net.channels * codec.config.latent_dim, dtype=param.dtype)
    stepper.advance(latents, active)  # prefill
    audio = 0.05 * torch.randn(batch, 1, SAMPLES_PER_STEP, dtype=param.dtype)
    step_latent = latents[:, -1:]
    times: dict[str, list[float]] = {"encode": [], "transformers": [], "decode": []}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        mu, enc_state = codec.encode_step(audio, enc_state)
        t1 = time.perf_counter()
        own, _ = stepper.advance(step_latent, active)  # the model's channel: [batch, latent]
        t2 = time.perf_counter()
        _, dec_state = codec.decode_step(own[:, None], dec_state)
        t3 = time.perf_counter()
        step_latent = own[:, None]
        if net.channels == 2:  # the caller's channel is what the encoder heard
            step_latent = torch.cat((mu, own[:, None]), dim=-1)
        if i >= warmup:
            times["encode"].append(t1 - t0)
            times["transformers"].append(t2 - t1)
            times["decode"].append(t3 - t2)

    def median_ms(xs: list[float]) -> float:
        return 1000 * sorted(xs)[len(xs) // 2]

    return StepCost(
        batch,
        torch.get_num_threads(),
        median_ms(times["encode"]),
        median_ms(times["transformers"]),
        median_ms(times["decode"]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Measure a step on the CPU for each thread count and batch, printing one JSON line each.

    Returns:
        The exit status, 0.
    """
    from hertz_agents.checkpoint import load_model

    p = argparse.ArgumentParser(
        prog="hertz_agents.train.bench", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--model", default="default", help="model name or directory")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    net = load_model(args.model, device="cpu", dtype=torch.float32)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            print(json.dumps(measure_step(net, batch, args.steps).as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
