"""Causal convolutions that run in one pass or stream chunk by chunk with explicit state.

Each stateful layer has ``forward(x)`` (one pass over a whole signal) and
``stream(x, cursor)``, which takes this layer's state from a :class:`StreamCursor`, processes
only the new chunk and hands the updated state back. The state of a whole codec is therefore a
flat list of tensors ``[B, channels, history]``, one per stateful layer, owned by whoever owns
the conversation (the engine keeps one row per session). Streaming equals the one-pass
computation exactly when every chunk is a multiple of the layer's stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StreamCursor:
    """Walks a codec's state list in layer order, collecting each layer's new state."""

    def __init__(self, states: list[Tensor]) -> None:
        self._states = states
        self._next = 0
        self.new_states: list[Tensor] = []

    def take(self) -> Tensor:
        """Return the next layer's state from the list."""
        state = self._states[self._next]
        self._next += 1
        return state

    def give(self, state: Tensor) -> None:
        """Record ``state`` as the next layer's new state."""
        self.new_states.append(state)


class CausalConv1d(nn.Module):
    """Conv1d with ``(kernel - 1) * dilation`` zeros of left padding (official key: ``.conv``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, bias=bias)
        self.history = (kernel - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:
        """Convolve the whole signal ``x`` [B, cin, T] with causal left padding."""
        return self.conv(F.pad(x, (self.history, 0)))

    def initial_state(self, batch: int, device, dtype) -> Tensor:
        """Return zeros [batch, cin, history]: the state before any input, equal to the padding."""
        # Zeros: exactly the one-pass left padding.
        return torch.zeros(batch, self.conv.in_channels, self.history, device=device, dtype=dtype)

    def stream(self, x: Tensor, cursor: StreamCursor) -> Tensor:
        """Convolve the new chunk ``x`` after the history held in ``cursor``; keep its new tail."""
        padded = torch.cat((cursor.take(), x), dim=-1)
        cursor.give(padded[..., padded.shape[-1] - self.history :])
        return self.conv(padded)


class CausalConvTranspose1d(nn.Module):
    """Upsampling transposed conv (kernel 2*stride): output block i depends on inputs i-1 and i.

    In one pass the input is left-padded by replicating its first frame, as the original does;
    streaming keeps the previous chunk's last frame, starting from the same replica.
    """

    def __init__(self, cin: int, cout: int, stride: int, bias: bool = True) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, bias=bias)
        self.stride = stride

    def _trim(self, y: Tensor) -> Tensor:
        return y[..., self.stride : y.shape[-1] - self.stride]

    def forward(self, x: Tensor) -> Tensor:
        """Upsample the whole signal ``x`` [B, cin, T], left-padded with its first frame."""
        return self._trim(self.deconv(torch.cat((x[..., :1], x), dim=-1)))

    def initial_state(self, batch: int, device, dtype) -> Tensor:
        """Return the "no frame yet" state [batch, cin, 1], filled with NaN."""
        # NaN marks "no frame yet": the first chunk replaces it with its own first frame.
        return torch.full(
            (batch, self.deconv.in_channels, 1), float("nan"), device=device, dtype=dtype
        )

    def stream(self, x: Tensor, cursor: StreamCursor) -> Tensor:
        """Upsample the new chunk ``x`` after the previous chunk's last frame held in ``cursor``."""
        previous = cursor.take()
        previous = torch.where(torch.isnan(previous), x[..., :1], previous)
        cursor.give(x[..., -1:])
        return self._trim(self.deconv(torch.cat((previous, x), dim=-1)))


def stateful_layers(module: nn.Module) -> list[nn.Module]:
    """The module's stateful layers in the order their ``stream`` calls visit them."""
    return [m for m in module.modules() if isinstance(m, (CausalConv1d, CausalConvTranspose1d))]
