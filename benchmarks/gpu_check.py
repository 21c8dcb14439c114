"""One-shot GPU check of the engine at the official size (random bf16 weights, no download).

Run on one GPU (sized to finish in under 8 minutes on an H100/H200):

    python benchmarks/gpu_check.py --json gpu_check.json

It reports, as one JSON object:

* ``ticks``: median/p90 step time of 1, 8 and 32 (and 64) sessions at position 1000, eager and
  compiled (``fullgraph=True``, CUDA graphs), against the targets (12 / 60 / 100 ms);
* ``memory``: bytes per session (measured allocation and the stepper's count), weights, and the
  largest batch that fits and keeps real time (from the measured ticks);
* ``quantized``: the int8 weight-only (and FP8 where supported) tick, and int8 KV caches;
* ``agreement``: bf16 on the GPU against fp32 on the CPU, a tiny configuration, same weights;
* ``rollover``: the slowest tick of 8 sessions crossing the context together, with the refill
  (shadow fill) and with the ring cache, and each one's bytes per session.

``--dry-run`` runs every part on the CPU with a tiny configuration and a few steps (CI runs it),
so the script is known to work before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hertz_agents.config import (  # noqa: E402
    HertzConfig,
    QuantizerConfig,
    ResynthesizerConfig,
    TransformerConfig,
)
from hertz_agents.engine.stepper import Stepper  # noqa: E402
from hertz_agents.model.hertz import HertzModel  # noqa: E402
from hertz_agents.model.quantize import fp8_supported, quantize_weights, weight_bytes  # noqa: E402
from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS  # noqa: E402

TARGET_MS = {1: 12.0, 32: 60.0, 64: 100.0}


def tiny_config() -> HertzConfig:
    return HertzConfig(
        codec=HertzConfig().codec.__class__(encode_channels=4, channel_ratios=(1, 2, 2, 2, 2, 2)),
        ar=TransformerConfig(dim=64, layers=2, heads=4, vocab_size=512, seq_len=256),
        resynthesizer=ResynthesizerConfig(
            dim=64, layers=2, heads=4, kv_heads=4, ff_dim=128, seq_len=256
        ),
        quantizer=QuantizerConfig(dim=32, ff_dim=64, fsq_levels=(8, 8, 8)),
    )


def random_model(config: HertzConfig, device: str, dtype: torch.dtype, seed: int = 0) -> HertzModel:
    """The model with random weights built on ``device`` (timing does not depend on them)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = HertzModel(config)
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(
                p, std=1.0 / p.shape[1] ** 0.5 / (p[0].numel() // p.shape[1]) ** 0.5
            )
        else:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
    model = _rebuild_buffers(model, config, device)
    return model.to(dtype).eval()


def _rebuild_buffers(model: HertzModel, config: HertzConfig, device: str) -> HertzModel:
    """Rotary tables and FSQ constants are computed, not learned: take them from a CPU build."""
    reference = _buffers_of(config)
    for name, _ in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        setattr(owner, attr, reference[name].to(device))
    return model


def _buffers_of(config: HertzConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shell = HertzModel(config)
    # The buffers are created with explicit device="cpu", so they are real even on meta.
    return dict(shell.named_buffers())


def time_ticks(
    stepper: Stepper, sessions: int, steps: int, warmup: int, position: int
) -> list[float]:
    for slot in range(sessions):
        stepper.jump_to(slot, position)
    active = torch.ones(sessions, dtype=torch.bool)
    audio = 0.05 * torch.randn(sessions, SAMPLES_PER_STEP, device=stepper.device)
    times = []
    for i in range(warmup + steps):
        sync(stepper.device)
        start = time.perf_counter()
        stepper.tick(sessions, active, audio, None, None)
        sync(stepper.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "max_ms": float(np.max(times)),
    }


def check(dry_run: bool) -> dict:
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    config = tiny_config() if dry_run else HertzConfig()
    sizes = [1, 2] if dry_run else [1, 8, 32, 64]
    steps, warmup, position = (2, 1, 40) if dry_run else (20, 3, 1000)
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    model = random_model(config, device, dtype)
    report["weights_bytes"] = weight_bytes(model)
    ticks: dict = {}
    compiled_sizes = [1] if dry_run else [1, 32]
    for compiled in (False, True):
        for b in compiled_sizes if compiled else sizes:
            if not fits(model, b):
                ticks[f"{b}_{'compiled' if compiled else 'eager'}"] = "does not fit in GPU memory"
                continue
            stepper = Stepper(
                model, b, compile=("eager" if dry_run else True) if compiled else False
            )
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            times = time_ticks(stepper, b, steps, warmup, position)
            ticks[f"{b}_{'compiled' if compiled else 'eager'}"] = summary(times)
            if not compiled:
                allocated = torch.cuda.memory_allocated() - before if device == "cuda" else None
                report.setdefault("memory", {})[str(b)] = {
                    "bytes_per_session": stepper.bytes_per_slot(),
                    "allocated_per_session": None if allocated is None else allocated / b,
                }
            del stepper
    report["ticks"] = ticks
    report["targets_ms"] = {str(k): v for k, v in TARGET_MS.items()}
    per_session = Stepper(model, 1).bytes_per_slot()
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
    real_time = [
        b
        for b in sizes
        if isinstance(ticks[f"{b}_eager"], dict)
        and ticks[f"{b}_eager"]["p90_ms"] < STEP_SECONDS * 1000
    ]
    report["largest_batch"] = {
        "measured_real_time": max(real_time, default=0),
        "fits_in_free_memory": int(free // per_session) if free else None,
    }
    report["quantized"] = quantized_ticks(config, device, dtype, sizes, steps, warmup, position)
    report["agreement"] = agreement(dry_run)
    report["rollover"] = {}
    for rollover in ("refill", "ring"):
        stepper = Stepper(
            model,
            sizes[min(1, len(sizes) - 1)],
            context=64 if dry_run else None,
            rollover=rollover,
        )
        b = stepper.table.slots
        times = time_ticks(stepper, b, steps + 4, warmup, stepper.context - 2)  # crosses it
        report["rollover"][rollover] = {
            "sessions": b,
            "rollovers": stepper.rollovers,
            "bytes_per_session": stepper.bytes_per_slot(),
            **summary(times),
        }
        del stepper
    return report


def quantized_ticks(config, device, dtype, sizes, steps, warmup, position) -> dict:
    out = {}
    modes = ["int8"] + (["fp8"] if device == "cpu" or fp8_supported(torch.device(device)) else [])
    for mode in modes:
        model = quantize_weights(random_model(config, device, dtype), mode)
        out[f"weights_{mode}"] = {"weights_bytes": weight_bytes(model)}
        for b in (sizes[0], sizes[-1]):
            if fits(model, b):
                out[f"weights_{mode}"][str(b)] = summary(
                    time_ticks(Stepper(model, b), b, steps, warmup, position)
                )
        del model
    model = random_model(config, device, dtype)
    b = sizes[-1]
    stepper = Stepper(model, 1, kv_dtype=torch.int8)
    out["kv_int8"] = {"bytes_per_session": stepper.bytes_per_slot()}
    if fits(model, b, torch.int8):
        out["kv_int8"][str(b)] = summary(
            time_ticks(Stepper(model, b, kv_dtype=torch.int8), b, steps, warmup, position)
        )
    return out


def fits(model: HertzModel, sessions: int, kv_dtype: torch.dtype | None = None) -> bool:
    """Whether ``sessions`` slots fit in the GPU's free memory (always on the CPU dry run)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return True
    torch.cuda.empty_cache()
    per_session = Stepper(model, 1, kv_dtype=kv_dtype).bytes_per_slot()
    return sessions * per_session < 0.85 * torch.cuda.mem_get_info()[0]


@torch.no_grad()
def agreement(dry_run: bool) -> dict:
    """The same tiny model in fp32 on the CPU and bf16 on the device, teacher-forced latents."""
    config = tiny_config()
    reference = random_model(config, "cpu", torch.float32, seed=1)
    device = "cpu" if dry_run else "cuda"
    other = random_model(config, device, torch.bfloat16, seed=1)
    latents = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(0))
    ref = reference.ar(latents)
    got = other.ar(latents.to(device, torch.bfloat16))
    agree = [
        float((r.argmax(-1) == g.float().cpu().argmax(-1)).float().mean()) for r, g in zip(ref, got)
    ]
    err = max(float((r - g.float().cpu()).abs().max() / r.abs().max()) for r, g in zip(ref, got))
    return {"token_agreement": float(np.mean(agree)), "max_rel_logit_error": err}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU, a few steps (CI)"
    )
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here; run with --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    started = time.perf_counter()
    torch.set_flush_denormal(True)  # random weights must not time denormal arithmetic
    report = check(args.dry_run)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
