"""Turning official state dicts into this project's module layout.

The official files keep weight norm as parametrizations (``original0`` = g, ``original1`` = v);
for inference we fold them into one plain ``weight`` = g * v / ||v||. The official codec file
also holds keys the model never used (the original loaded it with ``strict=False``):
``recon_metric.metrics.0.window`` and a ``pad_buffer`` per causal convolution. Exactly those are
dropped; any other missing, unexpected or mis-shaped key is an error that names it.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from hertz_agents.errors import CheckpointError

_G, _V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"
CODEC_UNUSED = re.compile(
    r"^(recon_metric\.metrics\.0\.window|(encoder|decoder)\.res_stack\.[\d.a-z_]*pad_buffer)$"
)


def fold_weight_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every (g, v) parametrization pair by the plain weight (norm over all dims but 0)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(_V):
            continue
        if key.endswith(_G):
            base = key[: -len(_G)]
            v = state.get(base + _V)
            if v is None:
                raise CheckpointError(
                    f"weight-norm key {base + _V!r} is missing (its g, {key!r}, is present)"
                )
            norm = v.float().norm(dim=tuple(range(1, v.dim())), keepdim=True)
            out[base + ".weight"] = (value.float() * v.float() / norm).to(v.dtype)
        else:
            out[key] = value
    for key in state:
        if key.endswith(_V) and key[: -len(_V)] + _G not in state:
            raise CheckpointError(
                f"weight-norm key {key[: -len(_V)] + _G!r} is missing (its v, {key!r}, is present)"
            )
    return out


def official_codec_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official codec state dict -> ``WaveCodec`` state dict (unused keys dropped, norm folded)."""
    kept = {k: v for k, v in state.items() if not CODEC_UNUSED.match(k)}
    return fold_weight_norm(kept)


def check_and_load(
    module: nn.Module, state: dict[str, Tensor], what: str, *, assign: bool = False
) -> None:
    """Load ``state`` strictly into ``module``; on any mismatch raise one error naming every key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the model configuration:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", shapes),
        ):
            if items:
                shown = ", ".join(items[:12]) + (
                    f" ... (+{len(items) - 12} more)" if len(items) > 12 else ""
                )
                parts.append(f"  {title} ({len(items)}): {shown}")
        parts.append(
            "  If this directory holds a smaller model, its config.json must give its sizes; "
            "if a file is damaged, download it again (`hertz-agents download`)."
        )
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state, strict=True, assign=assign)
