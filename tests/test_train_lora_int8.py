"""LoRA on an 8-bit frozen base (``lora.base_dtype = "int8"``): the trunk's and resynthesizer's
linear layers hold int8 weights (issue 15's per-row quantization), gradients flow through them to
the adapters and nowhere else, the base takes about half of bf16's bytes, a few steps follow the
bf16 base's losses, and the shipped recipe trains on it end to end (the adapter then loads onto
the float base like any other)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_fixtures import write_corpus

from hertz_agents.checkpoint import load_model
from hertz_agents.model.quantize import weight_bytes
from hertz_agents.train.ar_trainer import NextStepObjective, train_ar
from hertz_agents.train.config import RecipeError, load_ar_config
from hertz_agents.train.logs import read_log
from hertz_agents.train.lora_train import FrozenInt8Linear, prepare_lora
from hertz_agents.train.optim import make_optimizer

BASE = "default"  # the shipped small model stands in for hertz-dev


def test_the_int8_layer_passes_the_gradient_of_its_dequantized_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    frozen = FrozenInt8Linear(linear, "int8").requires_grad_(False)
    dequantized = frozen.weight_q.float() * frozen.scale[:, None]
    x = torch.randn(3, 5, 48, requires_grad=True)
    frozen(x).square().sum().backward()
    assert x.grad is not None
    ours = x.grad.clone()
    x.grad = None
    F.linear(x, dequantized, linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-5, atol=1e-5)
    assert frozen.weight_q.dtype == torch.int8 and frozen.weight_q.grad is None
    # The quantization error is that of per-row absmax int8, not more.
    assert (dequantized - linear.weight).abs().max() <= linear.weight.abs().max() / 127


def _few_steps(base_dtype: str, steps: int = 4) -> tuple[int, list[float], nn.Module]:
    """Frozen-base bytes and the losses of ``steps`` LoRA steps on fixed latents."""
    net = load_model(BASE, device="cpu", dtype=torch.float32)
    cfg = load_ar_config(
        "finetune_lora",
        [
            "data.train=.",
            "lora.rank=4",
            f'lora.base_dtype="{base_dtype}"',
            "optim.lr=3e-3",
            "optim.warmup_steps=1",
        ],
    )
    torch.manual_seed(0)
    adapters = prepare_lora(net, cfg, torch.device("cpu"), cached=True)
    base_bytes = weight_bytes(net.ar) + weight_bytes(net.resynthesizer)
    opt = make_optimizer(list(adapters.parameters()), cfg.optim)
    objective = NextStepObjective(net)
    latents = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base_dtype != "fp32"):
            ce, nll, _ = objective(latents)
        loss = ce.mean() + nll.mean()
        loss.backward()
        assert all(p.grad is not None for p in adapters.parameters())
        assert all(p.grad is None for p in net.parameters())  # the base gets none
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return base_bytes, losses, net


def test_an_int8_base_halves_the_frozen_bytes_and_follows_the_bf16_losses() -> None:
    int8_bytes, int8_losses, net = _few_steps("int8")
    bf16_bytes, bf16_losses, _ = _few_steps("bf16")
    linears = [m for m in net.ar.modules() if isinstance(m, nn.Linear)]
    assert not linears, "a trunk linear layer was left in float"
    quantizer = list(net.resynthesizer.quantizer.modules())
    # The quantizer stays float: its tokens are the trunk's vocabulary.
    assert not any(isinstance(m, FrozenInt8Linear) for m in quantizer)
    assert any(isinstance(m, nn.Linear) for m in quantizer)
    assert int8_bytes < 0.62 * bf16_bytes, (int8_bytes, bf16_bytes)
    assert int8_losses[-1] < int8_losses[0]  # the adapters learn through the int8 weights
    torch.testing.assert_close(
        torch.tensor(int8_losses), torch.tensor(bf16_losses), rtol=0.02, atol=0
    )


def test_an_int8_base_needs_bf16_autocast() -> None:
    from hertz_agents.train.checks import check_ar_recipe

    cfg = load_ar_config(
        "finetune_lora",
        [
            "data.train=.",
            "data.val=.",
            'model.init_from="default"',
            'lora.base_dtype="int8"',
            'run.precision="fp32"',
        ],
    )
    with pytest.raises(RecipeError, match='lora.base_dtype = "int8" runs under bf16 autocast'):
        check_ar_recipe(cfg)


def test_finetune_lora_trains_on_an_int8_base_and_the_adapter_loads_on_the_float_one(
    tmp_path: Path,
) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=2, seconds=4.0)
    out = tmp_path / "run"
    cfg = load_ar_config(
        "finetune_lora",
        [
            f'run.out_dir="{out}"',
            f'data.train="{corpus / "train"}"',
            f'data.val="{corpus / "val"}"',
            f'model.init_from="{BASE}"',
            'lora.base_dtype="int8"',
            "lora.rank=4",
            "optim.steps=2",
            "optim.batch_size=2",
            "optim.grad_accum=1",
            "optim.warmup_steps=1",
            "optim.lr=3e-3",
            "log.every=1",
            "log.val_every=2",
            "log.ckpt_every=2",
            "log.progress=false",
            "log.plot=false",
            "log.samples=false",
            "data.workers=0",
            "data.val_items=2",
            "run.threads=1",
        ],
    )
    final = train_ar(cfg)
    train = [r for r in read_log(out / "log.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    base = load_model(BASE, device="cpu", dtype=torch.float32)
    tuned = load_model(BASE, device="cpu", dtype=torch.float32, adapter=final)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert changed and all(".layers." in k for k in changed)
