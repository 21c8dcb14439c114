"""Weight-only quantization of the two transformers, applied from outside (gpt-fast style).

:func:`quantize_weights` swaps every ``nn.Linear`` of the AR trunk and the resynthesizer for a
quantized one in place; the model code does not change. The codec (convolutions, 1-2 % of the
weights) and the small quantizer MLP stay in float.

* ``"int8"``: int8 weights with one float scale per output row (symmetric absmax). A quarter of
  float32's bytes, half of bfloat16's. On the CPU it runs ``torch._weight_int8pack_mm`` where
  torch has it; elsewhere the weight is dequantized per call (memory saving, same math).
* ``"fp8"``: float8 e4m3 weights with one scale per output row. Needs a GPU with FP8 support
  (compute capability 8.9+: Ada, Hopper) on CUDA; on the CPU it runs dequantized (to measure its
  accuracy anywhere).

:func:`quality` measures what quantization costs against the float model on given latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.model.hertz import HertzModel

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MODES = ("int8", "fp8")


class QuantizedLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with ``q`` int8 or float8 [out, in], ``scale`` [out]."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        if mode == "int8":
            scale = absmax / 127.0
            q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            scale = absmax / FP8_MAX
            q = (w / scale).to(torch.float8_e4m3fn)
        self.mode = mode
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))
        self.bias = linear.bias
        self._packed_mm = (
            mode == "int8" and q.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] through the quantized weight (packed int8 mm on CPU)."""
        if self._packed_mm and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            flat = x.reshape(-1, self.in_features)
            y = torch._weight_int8pack_mm(flat, self.weight_q, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def fp8_supported(device: torch.device) -> bool:
    """FP8 weights are worth it on CUDA GPUs of compute capability 8.9+ (Ada, Hopper)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@torch.no_grad()
def quantize_weights(model: HertzModel, mode: str) -> HertzModel:
    """Quantize the AR trunk's and the resynthesizer's linear layers in place; returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"weight quantization must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    if mode == "fp8" and device.type == "cuda" and not fp8_supported(device):
        raise ValueError(
            "fp8 weights need a GPU of compute capability 8.9+ (Ada, Hopper); use int8"
        )
    for network in (model.ar, model.resynthesizer):
        for name, module in list(network.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not name.startswith("quantizer"):
                    setattr(module, child_name, QuantizedLinear(child, mode))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (quantized weights count at their stored size)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def quality(reference: HertzModel, quantized: HertzModel, latents: Tensor) -> dict[str, float]:
    """Teacher-forced comparison on ``latents`` [B, T, C*32] (one pass, no sampling noise).

    Returns token agreement (argmax of the trunk's logits, every channel), the mean KL divergence
    of the quantized trunk's token distribution from the float one (nats), and the mean absolute
    error of the resynthesizer mixtures' means (the expected next latent) relative to their
    mean absolute value.
    """
    ref_logits, q_logits = reference.ar(latents), quantized.ar(latents)
    agree, kl = [], []
    for r, q in zip(ref_logits, q_logits):
        agree.append((r.argmax(-1) == q.argmax(-1)).float().mean())
        kl.append(
            F.kl_div(
                q.float().log_softmax(-1),
                r.float().log_softmax(-1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)
            .mean()
        )
    tokens = torch.stack([lg.argmax(-1)[:, -1] for lg in ref_logits], dim=1)
    errors = []
    for r, q in zip(
        reference.resynthesizer(latents, tokens), quantized.resynthesizer(latents, tokens)
    ):
        mean_r, mean_q = _mixture_mean(r), _mixture_mean(q)
        errors.append((mean_r - mean_q).abs().mean() / mean_r.abs().mean().clamp(min=1e-12))
    return {
        "token_agreement": float(torch.stack(agree).mean()),
        "trunk_kl_nats": float(torch.stack(kl).mean()),
        "latent_mean_rel_error": float(torch.stack(errors).mean()),
    }


def _mixture_mean(params: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    locs, _, weights = params
    return (weights.float().softmax(-1)[..., None] * locs.float()).sum(-2)
