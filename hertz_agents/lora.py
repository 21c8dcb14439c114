"""Low-rank adapters (LoRA) on a model's linear projections, attached from outside.

An adapter adds ``scale * B(A(dropout(x)))`` to the output of a frozen ``nn.Linear`` (or of
the int8 ``QuantizedLinear`` that replaces one in an 8-bit base)
(``A``: in -> rank, ``B``: rank -> out, ``B`` starts at zero so a new adapter changes nothing;
``scale = alpha / rank``). Adapters hang on the model through forward hooks, so the model's own
modules, parameter names and files stay as they are: the same checkpoint loads with or without
them, and the modules need no LoRA code (the way gpt-fast wraps a model from outside).

Files follow PEFT's conventions, so the weights read like a PEFT LoRA adapter:

* ``adapter_config.json``: ``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules``, ``bias`` "none", ``base_model_name_or_path``, plus ``"format":
  "hertz-agents-lora"`` and the model ``parts`` the targets were looked for in;
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` ``[rank, in]``
  and ``...lora_B.weight`` ``[out, rank]``, float32.

PEFT itself is not used: it wraps modules (renaming every base weight to ``base_layer``) and
pulls in transformers, while serving needs only :func:`merge_adapter`, which folds the adapter
into the weights (``W += scale * B @ A``) so inference costs nothing extra.

    adapters = LoRAAdapters.attach(net, LoRASpec(rank=32, alpha=32))   # training
    save_adapter(adapters, "runs/x/final", base_model="hertz-dev")
    net = load_model("hertz-dev", adapter="runs/x/final")                # serving: merged
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hertz_agents.errors import CheckpointError
from hertz_agents.model.quantize import QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "hertz-agents-lora"
KEY_PREFIX = "base_model.model."  # PEFT's prefix of saved adapter keys

DEFAULT_TARGETS = ("proj_qkv", "attn_out", "gateup_proj", "down_proj")
"""The projections of every transformer block: attention in/out and the gated FFN."""


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how.

    Attributes:
        rank: Inner dimension of each adapter.
        alpha: Scale numerator (``scale = alpha / rank``); 0 means ``alpha = rank``.
        dropout: Dropout on the adapter's input while training.
        targets: Last names of the ``nn.Linear`` modules to adapt.
        parts: Top-level parts searched (``ar``: the trunk, ``resynthesizer``), only inside their
            transformer blocks (``.layers.``); the quantizer is never adapted (its tokens are the
            trunk's vocabulary).
    """

    rank: int
    alpha: float = 0.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    parts: tuple[str, ...] = ("ar", "resynthesizer")

    @property
    def scale(self) -> float:
        """The factor on the low-rank update: ``alpha / rank`` (``alpha`` defaults to the rank)."""
        return (self.alpha or self.rank) / self.rank

    def selects(self, path: str) -> bool:
        """Whether the linear layer at ``path`` (``ar.layers.3.attn.attn.proj_qkv``) is adapted."""
        return (
            path.split(".", 1)[0] in self.parts
            and ".layers." in path
            and ".quantizer." not in path
            and path.rsplit(".", 1)[-1] in self.targets
        )


class LoRALinear(nn.Module):
    """The low-rank update of one ``in -> out`` projection (float32, whatever the base is)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT; B = 0: no change
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """The low-rank update ``scale * B(A(dropout(x)))`` for input ``x`` [..., in_features]."""
        dtype = (
            self.lora_A.weight.dtype if not torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        return self.lora_B(self.lora_A(self.dropout(x.to(dtype)))) * self.scale

    def delta(self) -> Tensor:
        """``scale * B @ A``, ``[out, in]`` in float32: what merging adds to the weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


class LoRAAdapters(nn.Module):
    """Every adapter of one model, keyed by the adapted module's path.

    Its ``state_dict`` holds only the adapters (what a LoRA checkpoint saves). Attach with
    :meth:`attach`; :meth:`detach` removes the hooks and leaves the model as it was.
    """

    def __init__(self, spec: LoRASpec, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.spec = spec
        self.paths = sorted(shapes)
        # ModuleDict keys cannot hold dots: "ar.layers.0..." is stored as "ar/layers/0/...".
        self.adapters = nn.ModuleDict(
            {
                p.replace(".", "/"): LoRALinear(i, o, spec.rank, spec.scale, spec.dropout)
                for p, (i, o) in shapes.items()
            }
        )
        self._hooks: list[Any] = []

    def adapter(self, path: str) -> LoRALinear:
        """The adapter attached to the linear layer at module ``path`` (dotted)."""
        return self.adapters[path.replace(".", "/")]  # type: ignore[return-value]

    @classmethod
    def attach(cls, model: nn.Module, spec: LoRASpec) -> LoRAAdapters:
        """New adapters (on the model's device) on every linear layer ``spec`` selects."""
        linears = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantizedLinear)) and spec.selects(n)
        }
        if not linears:
            raise ValueError(
                f"no linear layer of the model matches targets {list(spec.targets)} "
                f"in {list(spec.parts)}"
            )
        first = next(iter(linears.values()))
        # Made in place, on the device of the adapted weights (a float weight, or int8 ones).
        weight = first.weight_q if isinstance(first, QuantizedLinear) else first.weight
        assert isinstance(weight, Tensor)
        with torch.device(weight.device):
            adapters = cls(spec, {n: (m.in_features, m.out_features) for n, m in linears.items()})
        adapters.hook(model)
        return adapters

    def hook(self, model: nn.Module) -> None:
        """Add each adapter's output to its layer's (forward hooks; no module is replaced)."""
        self.detach()
        modules = dict(model.named_modules())
        for path in self.paths:
            lora = self.adapter(path)

            def add(
                _module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, lora=lora
            ) -> Tensor:
                return output + lora(inputs[0]).to(output.dtype)

            self._hooks.append(modules[path].register_forward_hook(add))

    def detach(self) -> None:
        """Remove the forward hooks, leaving the base model as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def peft_state_dict(self) -> dict[str, Tensor]:
        """Adapter weights under PEFT's key names, float32 on the CPU."""
        out = {}
        for path in self.paths:
            lora = self.adapter(path)
            for name in ("lora_A", "lora_B"):
                weight = getattr(lora, name).weight
                out[f"{KEY_PREFIX}{path}.{name}.weight"] = (
                    weight.detach().float().cpu().contiguous()
                )
        return out


def save_adapter(
    adapters: LoRAAdapters,
    directory: str | os.PathLike[str],
    base_model: str = "",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    spec = adapters.spec
    config = {
        "format": ADAPTER_FORMAT,
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha or spec.rank,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "parts": list(spec.parts),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
        **(extra or {}),
    }
    save_file(adapters.peft_state_dict(), str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding a LoRA adapter (its ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).exists()


def read_adapter(
    directory: str | os.PathLike[str],
) -> tuple[LoRASpec, dict[str, Tensor], dict[str, Any]]:
    """(spec, ``{module path: (A, B)}`` flattened as ``path.lora_A``/``path.lora_B``, config)."""
    path = Path(directory)
    if not is_adapter_dir(path):
        raise CheckpointError(
            f"{path} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); give a run's final/"
        )
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        weights = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # JSON, missing or truncated safetensors
        raise CheckpointError(
            f"{path}: the adapter files cannot be read ({e}); copy them again"
        ) from e
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{path}: a {config.get('peft_type')} adapter; only LoRA is supported"
        )
    spec = LoRASpec(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        targets=tuple(config.get("target_modules", DEFAULT_TARGETS)),
        parts=tuple(config.get("parts", ("ar", "resynthesizer"))),
    )
    state = {k[len(KEY_PREFIX) :] if k.startswith(KEY_PREFIX) else k: v for k, v in weights.items()}
    return spec, state, config


def load_adapter_into(adapters: LoRAAdapters, directory: str | os.PathLike[str]) -> None:
    """Load saved adapter weights into attached ``adapters`` (to continue training them)."""
    _, state, _ = read_adapter(directory)
    for path in adapters.paths:
        lora = adapters.adapter(path)
        lora.lora_A.weight.data.copy_(state[f"{path}.lora_A.weight"])
        lora.lora_B.weight.data.copy_(state[f"{path}.lora_B.weight"])


@torch.no_grad()
def merge_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Fold a saved adapter into ``model``'s weights (``W += scale * B @ A``), in place.

    Every adapted layer must exist in ``model`` with the adapter's shape; otherwise a
    :class:`CheckpointError` says the adapter belongs to another model. Each weight is replaced
    by a new tensor (never written through), so a memory-mapped checkpoint file stays intact.
    """
    spec, state, config = read_adapter(directory)
    modules = dict(model.named_modules())
    paths = sorted({k.rsplit(".", 2)[0] for k in state})
    for path in paths:
        layer = modules.get(path)
        a, b = state.get(f"{path}.lora_A.weight"), state.get(f"{path}.lora_B.weight")
        if not isinstance(layer, nn.Linear) or a is None or b is None:
            raise CheckpointError(
                f"{directory}: adapter for {path}, which this model does not have"
            )
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            base = config.get("base_model_name_or_path") or "another model"
            raise CheckpointError(
                f"{directory}: adapter for {path} is {b.shape[0]}x{a.shape[1]}, the model's layer "
                f"{tuple(layer.weight.shape)}: it was trained on {base}"
            )
        weight = layer.weight
        delta = (b.to(weight.device).float() @ a.to(weight.device).float()) * spec.scale
        layer.weight = nn.Parameter(
            (weight.float() + delta).to(weight.dtype), requires_grad=weight.requires_grad
        )
    return model


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRAAdapters",
    "LoRALinear",
    "LoRASpec",
    "is_adapter_dir",
    "load_adapter_into",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
]
