"""The engine's CPU figures for issue 15, measured side by side in one run.

* ``ticks``: the default model's tick (median ms) at positions 50, 1000 and 2000 for 1, 8, 16
  and 32 sessions (attention reads the live context bucket only);
* ``rollover``: 8 sessions opened together crossing a 128-position context (median, max);
* ``int8``: the default model's tick with int8 weight-only transformers against float;
* ``quality``: int8 and fp8 weights against float, teacher-forced on real speech latents
  (default model) and on full-width random layers (dim 4096);
* ``sessions_per_gpu``: official-size bytes per session (bf16, and int8 KV) and how many
  sessions fit in 24, 80 and 141 GB beside the bf16 / int8 weights.

Rounds alternate between the configurations so machine noise hits them alike.

    python benchmarks/engine_scale.py --rounds 2 --steps 3 --threads 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hertz_agents.benchmark import bench_ticks  # noqa: E402
from hertz_agents.checkpoint import load_model  # noqa: E402
from hertz_agents.config import HertzConfig, TransformerConfig  # noqa: E402
from hertz_agents.engine.stepper import Stepper  # noqa: E402
from hertz_agents.model.hertz import HertzModel  # noqa: E402
from hertz_agents.model.quantize import quality, quantize_weights, weight_bytes  # noqa: E402

GB = 1e9
RESERVE_GB = 2.0  # CUDA context, activations, allocator slack


def tick_ms(model, sessions: int, position: int, steps: int, context: int | None = None) -> dict:
    r = bench_ticks(model, sessions, steps, warmup=1, start_position=position, context=context)
    return {"median": r.step_ms_median, "max": r.step_ms_max, "rollovers": r.rollovers}


def real_latents(model: HertzModel, seconds: float = 16.0) -> torch.Tensor:
    """Stereo latents of a real recording from shared/audio (both channels), [1, T, 64]."""
    from hertz_agents.audio import read_audio

    files = sorted((Path(__file__).resolve().parents[2] / "shared" / "audio").glob("*.wav"))
    audio = read_audio(files[0], channels=2)[:, : int(seconds * 16000)]
    usable = audio.shape[1] // 2000 * 2000
    wave = torch.from_numpy(np.ascontiguousarray(audio[:, :usable])).float()[:, None]
    with torch.no_grad():
        latents = model.codec.encode(wave)  # [2, T, 32]
    return latents.transpose(0, 1).reshape(1, latents.shape[1], -1)


def quality_figures(default: HertzModel) -> dict:
    out = {}
    latents = real_latents(default)
    for mode in ("int8", "fp8"):
        q = quantize_weights(load_model("default", device="cpu"), mode)
        out[f"default_{mode}"] = quality(default, q, latents)
    wide = HertzConfig(ar=TransformerConfig(dim=4096, layers=1, heads=32, vocab_size=32768))
    wide = HertzConfig(
        ar=wide.ar, resynthesizer=wide.resynthesizer.__class__(layers=2), quantizer=wide.quantizer
    )
    torch.manual_seed(0)
    ref = HertzModel(wide).eval()
    x = torch.randn(1, 32, 64)
    for mode in ("int8", "fp8"):
        q = HertzModel(wide).eval()
        q.load_state_dict(ref.state_dict())
        out[f"full_width_random_{mode}"] = quality(ref, quantize_weights(q, mode), x)
    return out


def sessions_per_gpu() -> dict:
    with torch.device("meta"):
        official = HertzModel(HertzConfig()).to(torch.bfloat16)
    weights_bf16 = weight_bytes(official)
    weights_int8 = (
        sum(
            p.numel()
            for n, p in official.named_parameters()
            if n.startswith(("ar.", "resynthesizer.")) and p.dim() == 2
        )
        + 0
    )
    weights_int8 = weights_bf16 - weights_int8  # the int8 linear weights take 1 byte, not 2
    out: dict = {"weights_gb": {"bf16": weights_bf16 / GB, "int8": weights_int8 / GB}}
    for name, kv in (("bf16_kv", None), ("int8_kv", torch.int8)):
        per = Stepper(official, 1, kv_dtype=kv).bytes_per_slot()
        out[name] = {"gb_per_session": per / GB}
        for gpu in (24, 80, 141):
            for weights, wb in (("bf16_weights", weights_bf16), ("int8_weights", weights_int8)):
                out[name][f"{gpu}GB_{weights}"] = max(
                    0, int((gpu * GB - wb - RESERVE_GB * GB) // per)
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--positions", type=int, nargs="+", default=[50, 1000, 2000])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    int8 = quantize_weights(load_model("default", device="cpu"), "int8")
    samples: dict[str, list[float]] = {}
    rollover: list[dict] = []
    for r in range(args.rounds):
        for b in args.sessions:
            for pos in args.positions:
                samples.setdefault(f"{b}@{pos}", []).append(
                    tick_ms(model, b, pos, args.steps)["median"]
                )
        for b in (1, 8):
            samples.setdefault(f"float_{b}@50", []).append(
                tick_ms(model, b, 50, args.steps)["median"]
            )
            samples.setdefault(f"int8_{b}@50", []).append(
                tick_ms(int8, b, 50, args.steps)["median"]
            )
        # 8 sessions opened together, from position 100 across a 128-position context.
        rollover.append(tick_ms(model, 8, 100, 40, context=128))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    report = {
        "threads": args.threads,
        "ticks_ms": {k: v for k, v in med.items() if not k.startswith(("float", "int8"))},
        "eight_over_one_at_50": med["8@50"] / med["1@50"] if "8@50" in med else None,
        "int8_ms": {k: v for k, v in med.items() if k.startswith(("float", "int8"))},
        "rollover_8_sessions_context_128": {
            "median_ms": float(np.median([x["median"] for x in rollover])),
            "max_ms": float(max(x["max"] for x in rollover)),
            "rollovers_per_round": rollover[0]["rollovers"],
        },
        "quality": quality_figures(model),
        "sessions_per_gpu": sessions_per_gpu(),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
