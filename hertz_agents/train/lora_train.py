"""What the AR phase does differently for LoRA, and activation checkpointing.

With ``lora.rank`` > 0 the whole model is frozen; the trunk's and resynthesizer's transformer
weights are held in ``lora.base_dtype`` (bf16: 2 bytes a weight instead of 4; int8: the linear
layers' weights as int8 with one scale per output row, 1 byte a weight, the norms in bf16), the
quantizer stays float32 (its tokens are the trunk's vocabulary), and the codec leaves the GPU
when the corpus is already encoded. Only the adapters (float32) train, checkpoint and export.

Activation checkpointing (``model.checkpointing``) keeps only each transformer block's input
during the forward pass and recomputes the block in the backward: activation memory becomes
one block's worth plus one ``[B, T, dim]`` tensor per block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from hertz_agents.lora import LoRAAdapters, LoRASpec
from hertz_agents.model.hertz import HertzModel
from hertz_agents.model.quantize import QuantizedLinear
from hertz_agents.train.config import ARTrainConfig

# The frozen base's parameters; "int8" keeps what is not a linear weight (norms) in bf16.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16}


class _Int8MatMul(torch.autograd.Function):
    """``x @ (q * scale).T`` that saves the int8 weight for the backward, not a float copy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        q, scale = ctx.saved_tensors
        # The frozen weight gets no gradient; the input's flows to the adapters upstream.
        return (grad * scale.to(grad.dtype)) @ q.to(grad.dtype), None, None


class FrozenInt8Linear(QuantizedLinear):
    """A frozen int8 linear layer (issue 15's weight-only quantization) gradients flow through.

    ``QuantizedLinear`` serves inference (its packed CPU kernel has no backward, and its
    per-call dequantized weight would be saved for the backward at full size); this one
    dequantizes in the forward and again in the backward, keeping only the int8 weight.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] in the autocast dtype (or ``x``'s)."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _Int8MatMul.apply(x, self.weight_q, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_base(net: HertzModel) -> None:
    """Swap the trunk's and resynthesizer's linear layers (not the quantizer's) for int8 ones."""
    for network in (net.ar, net.resynthesizer):
        for name, module in list(network.named_modules()):
            if name.startswith("quantizer"):
                continue
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    frozen = FrozenInt8Linear(child, "int8")
                    frozen.requires_grad_(False)
                    setattr(module, child_name, frozen)


def blocks_of(net: HertzModel) -> list[nn.Module]:
    """The transformer blocks of the trunk and the resynthesizer."""
    return [*net.ar.layers, *net.resynthesizer.stack.layers]


def checkpoint_blocks(net: HertzModel) -> None:
    """Recompute every transformer block in the backward pass.

    From outside: each block's ``forward`` is wrapped on the instance; names, weights and the
    cached step are unchanged.
    """
    for block in blocks_of(net):
        if getattr(block, "_checkpointed", False):
            continue
        forward = block.forward

        def run(
            x: Tensor,
            positions: Tensor,
            cache: Any = None,
            length: int | None = None,
            *,
            visible: Tensor | None = None,
            forward: Any = forward,
        ) -> Tensor:
            # The block's own signature (x, positions, cache, length, *, visible): the trunk
            # passes the first four positionally, so the bound forward must not be a positional
            # parameter here.
            if cache is None and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(
                    forward, x, positions, None, length, visible=visible, use_reentrant=False
                )
            return forward(x, positions, cache, length, visible=visible)

        block.forward = run  # type: ignore[method-assign]
        block._checkpointed = True  # type: ignore[assignment]


def lora_spec(cfg: ARTrainConfig) -> LoRASpec:
    """The LoRA spec (rank, alpha, dropout, targets, parts) of a recipe's ``lora`` table."""
    lora = cfg.lora
    return LoRASpec(lora.rank, lora.alpha, lora.dropout, tuple(lora.targets), tuple(lora.parts))


def prepare_lora(
    net: HertzModel, cfg: ARTrainConfig, device: torch.device, cached: bool
) -> LoRAAdapters:
    """Freeze ``net``, place its parts (base in ``lora.base_dtype``) and attach new adapters."""
    net.requires_grad_(False)
    if cfg.lora.base_dtype == "int8":  # from the float32 weights, before the rest goes to bf16
        quantize_base(net)
    base = DTYPES[cfg.lora.base_dtype]
    quantizer = set(net.resynthesizer.quantizer.modules())
    for module in [*net.ar.modules(), *net.resynthesizer.modules()]:
        dtype = torch.float32 if module in quantizer else base
        # Parameters one by one (not module.to): buffers such as the rotary tables stay float32.
        for name, param in list(module.named_parameters(recurse=False)):
            moved = nn.Parameter(param.detach().to(device=device, dtype=dtype), requires_grad=False)
            setattr(module, name, moved)
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device=device))
    # Encoded once already: the codec is not needed on the GPU (validation reads the cache too).
    codec_device = torch.device("cpu") if cached else device
    if next(net.codec.parameters()).device != codec_device:
        net.codec.to(codec_device)
    return LoRAAdapters.attach(net, lora_spec(cfg))


def trainable_summary(net: nn.Module, adapters: LoRAAdapters) -> str:
    """A log line: layers adapted, and parameters trained out of the frozen model's."""
    frozen = sum(p.numel() for p in net.parameters())
    trained = sum(p.numel() for p in adapters.parameters())
    layers = len(adapters.paths)
    return f"LoRA: {layers} layers adapted, {trained / 1e6:.2f}M trained of {frozen / 1e6:.1f}M"
