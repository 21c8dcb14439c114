"""Peak memory of one LoRA training step of hertz-dev, measured without a GPU.

    python -m hertz_agents.train.lora_memory                      # the table of docs/training.md
    python -m hertz_agents.train.lora_memory --check-real 32      # fake == real tensors, at T = 32
    python -m hertz_agents.train.lora_memory --base-dtype int8    # the same with an 8-bit base

The step is the real one (:class:`NextStepObjective` on the model that ``finetune_lora``
prepares: bf16 base, float32 quantizer, rank-32 adapters, blocks recomputed in the backward,
bf16 autocast, AdamW, two steps so the optimizer's state exists), run at full width on the
CPU under PyTorch's ``FakeTensorMode``: every tensor is created with its real shape, dtype and
lifetime (parameters, saved activations, recomputation, gradients, optimizer state) but no
memory is filled and no arithmetic is done, so a 2,048-step conversation takes seconds.
``MemTracker`` (``torch.distributed._tools.mem_tracker``) records the live bytes by category and
their peak. ``--check-real`` runs the same step on real tensors (narrower, to stay cheap on a
CPU) and shows the two counts agree, so the fake run measures what a real one holds.

Measured for a few layers and fitted as ``fixed + trunk_layers * a + resynth_pairs * b``
(the resynthesizer grows in pairs: one layer before the injection, one after it that runs once per
channel), then extrapolated to hertz-dev's 32 + 8 layers and checked against a fake run of the
whole model. Not included: the CUDA context and cuBLAS workspace (about 0.5-1 GB) and allocator
fragmentation; the codec stays on the CPU (the corpus is encoded once, before training).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from hertz_agents.config import HertzConfig, ResynthesizerConfig, TransformerConfig
from hertz_agents.model.hertz import HertzModel
from hertz_agents.train.ar_trainer import NextStepObjective
from hertz_agents.train.config import load_ar_config
from hertz_agents.train.lora_train import checkpoint_blocks, prepare_lora
from hertz_agents.train.optim import make_optimizer

GIB = 1024**3


def build(
    trunk_layers: int,
    resynth_layers: int,
    rank: int,
    checkpointing: bool,
    narrow: bool = False,
    base_dtype: str = "bf16",
):
    """hertz-dev's widths with fewer layers, prepared as ``finetune_lora`` prepares it.

    ``narrow``: widths / 16, for a real-tensor check a CPU can afford. ``base_dtype``: the frozen
    base's (``lora.base_dtype``: bf16 or int8).
    """
    cfg = load_ar_config(
        "finetune_lora",
        [
            "data.train=.",
            f"lora.rank={rank}",
            f"model.checkpointing={str(checkpointing).lower()}",
            f'lora.base_dtype="{base_dtype}"',
        ],
    )
    full = HertzConfig(split=True)
    ar = dataclasses.replace(full.ar, layers=trunk_layers)
    resynth = dataclasses.replace(full.resynthesizer, layers=resynth_layers)
    quantizer = full.quantizer
    if narrow:
        ar = dataclasses.replace(ar, dim=256, heads=2, ff_dim=688)
        resynth = dataclasses.replace(resynth, dim=256, heads=2, kv_heads=2, ff_dim=688)
        quantizer = dataclasses.replace(quantizer, dim=128, ff_dim=512)
    config = dataclasses.replace(full, ar=ar, resynthesizer=resynth, quantizer=quantizer)
    net = HertzModel(config)
    adapters = prepare_lora(net, cfg, torch.device("cpu"), cached=True)
    if checkpointing:
        checkpoint_blocks(net)
    opt = make_optimizer(list(adapters.parameters()), cfg.optim)
    return net, adapters, opt


class LiveBytes(TorchDispatchMode):
    """Bytes of every tensor storage alive, and their peak.

    Each storage an operator returns is counted once, until Python frees it (fake storages have
    real sizes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def track(self, *tensors: object) -> None:
        """Count the storages of ``tensors`` not seen yet and update the peak."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.seen:
                continue
            nbytes = storage.nbytes()
            self.seen[storage] = nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.track(*pytree.tree_leaves(out))
        return out


@contextlib.contextmanager
def fake(enabled: bool) -> Iterator[None]:
    """Run the block under a ``FakeTensorMode`` (no real memory) when ``enabled``."""
    if not enabled:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        yield


def peak_bytes(
    trunk_layers: int,
    resynth_layers: int,
    steps: int = 2048,
    batch: int = 1,
    rank: int = 32,
    checkpointing: bool = True,
    real: bool = False,
    narrow: bool = False,
    base_dtype: str = "bf16",
) -> dict[str, int]:
    """Bytes held for the whole run (``weights``) and the peak of two training steps."""
    torch.manual_seed(0)
    with fake(not real):
        net, adapters, opt = build(
            trunk_layers, resynth_layers, rank, checkpointing, narrow, base_dtype
        )
        latents = torch.randn(batch, steps, 64)
        tracker = LiveBytes()
        tracker.track(*net.ar.parameters(), *net.resynthesizer.parameters(), *adapters.parameters())
        tracker.track(*net.ar.buffers(), *net.resynthesizer.buffers(), latents)
        static = tracker.current
        objective = NextStepObjective(net)
        with tracker:
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    ce, nll, _ = objective(latents)
                (ce.mean() + nll.mean()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del ce, nll
    return {"weights": static, "peak": tracker.peak}


def table(
    rank: int = 32, steps: int = 2048, base_dtype: str = "bf16"
) -> list[tuple[str, float, float]]:
    """Rows of (what, weights GiB, peak GiB).

    The rows are the measured layer counts, the fit and its extrapolation to hertz-dev's 32 + 8
    layers, and a fake run of the whole model.
    """
    runs = {
        lay: peak_bytes(*lay, steps=steps, rank=rank, base_dtype=base_dtype)
        for lay in ((1, 2), (2, 2), (1, 4))
    }
    trunk, resynth = TransformerConfig().layers, ResynthesizerConfig().layers

    def fit(key: str) -> tuple[float, float, float]:
        base = runs[(1, 2)][key]
        a, b = runs[(2, 2)][key] - base, runs[(1, 4)][key] - base
        return a, b, base + (trunk - 1) * a + (resynth - 2) // 2 * b

    whole = peak_bytes(trunk, resynth, steps=steps, rank=rank, base_dtype=base_dtype)
    rows = [
        (f"measured: {t} trunk + {r} resynthesizer layers", v["weights"], v["peak"])
        for (t, r), v in runs.items()
    ]
    (wa, wb, wx), (pa, pb, px) = fit("weights"), fit("peak")
    rows += [
        ("a: one more trunk layer", wa, pa),
        ("b: one more pair of resynthesizer layers", wb, pb),
        (f"extrapolated to {trunk} + {resynth}: M(1,2) + 31 a + 3 b", wx, px),
        (f"fake run of all {trunk} + {resynth} layers", whole["weights"], whole["peak"]),
    ]
    return [(name, w / GIB, p / GIB) for name, w, p in rows]


def main() -> None:
    """Print the memory table from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=2048, help="conversation length in 125 ms steps"
    )
    parser.add_argument(
        "--check-real", type=int, default=0, metavar="T",
        help="compare fake and real tensors at T steps (1 + 2 layers, widths / 16)",
    )  # fmt: skip
    parser.add_argument(
        "--base-dtype", choices=("bf16", "int8"), default="bf16",
        help="the frozen base's weights (lora.base_dtype)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.check_real:
        kw = {"steps": args.check_real, "rank": args.rank, "narrow": True}
        a = peak_bytes(1, 2, base_dtype=args.base_dtype, **kw)
        b = peak_bytes(1, 2, base_dtype=args.base_dtype, real=True, **kw)
        for k in sorted(a):
            print(f"{k:>8}: fake {a[k]} bytes, real {b[k]} bytes")
        return
    title = f"{args.base_dtype} base, rank {args.rank}, {args.steps} steps"
    print(f"| {title:<58} | weights | peak |")
    print(f"| {'---':<58} | --- | --- |")
    for name, weights, peak in table(args.rank, args.steps, args.base_dtype):
        print(f"| {name:<58} | {weights:.2f} GiB | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
