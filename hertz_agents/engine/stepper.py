"""The one place a step of the model is written: batched ticks, prefill, positions and rollover.

A live tick (:meth:`Stepper.tick`) does constant work per conversation: encode the caller's new
2000 samples with the streaming encoder, feed (caller latent, model's own last latent) at the
conversation's position through the cached AR trunk and resynthesizer, sample the model's next
latent and decode it with the streaming decoder. Offline generation and the benchmarks use
:meth:`Stepper.advance` (feed latents, sample the next ones), prompts :meth:`Stepper.prefill`.

* **Only the channels that are used are computed.** A live step uses the model's channel only:
  the caller's output head, token and latent sampling and the resynthesizer's per-channel
  layers are skipped (their caches are not even allocated). The random numbers are still drawn
  in the same order (:class:`~hertz_agents.sampling.SamplingNoise`), so the model's channel is
  the same whichever channels run.
* **Attention reads the live context only**: the first ``length`` cache positions, ``length``
  the smallest bucket (powers of two, and the context) above every stepped row's position, so
  each bucket is one static shape (one compiled graph, one CUDA graph).
* **Rollover without a stall**, two ways (``rollover``):

  - ``"refill"`` (hertz-dev's default, the original's behaviour): when a call fills the context,
    the last ``keep`` latents are re-prefilled at positions 0..keep-1 (rotary positions are
    absolute: keys cannot be shifted). Instead of doing that in one tick, a shadow cache is
    filled with that window ``chunk`` positions at a time as its latents arrive (before the first
    rollover every ``chunk`` ticks, after one about every tick), and the rollover tick only
    copies it into place. The result equals the one-shot re-prefill up to float rounding
    (tested). The fill costs compute: ``keep / (context - keep)`` positions per tick per call
    from the first rollover on.
  - ``"ring"``: the caches are rings (:meth:`~hertz_agents.model.kv_cache.KVCache.as_ring`):
    positions stay absolute, each new key overwrites the oldest, and the first ``sink``
    positions of the call stay pinned. Nothing is recomputed and no shadow cache is held;
    attention always sees the last ``context - sink`` positions (and the sink). So that positions
    stay bounded (a static rotary table, no recompiles), a row that has gone a lap past the
    context is **rebased**: its ring's keys are turned back by one lap (``context - sink``
    positions, a rotation: attention depends only on differences of positions) and so is its
    position; the sink is not turned, so it is always seen between one lap and the context plus
    a lap away. One row is rebased per tick (a pass over its keys, no forward), the furthest
    first. Its quality against the refill is measured in ``benchmarks/rollover_quality.py``.
* **Positions** live on the device (read by the compiled step) and in a host mirror that only
  the stepper writes, so scheduling never waits on the device.

Rows that are not stepping in a tick are computed but their state is left unchanged by masked
updates. Their KV write lands at their current position, which their next real step overwrites
before anyone reads it.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hertz_agents.config import ROLLOVERS, usable_context
from hertz_agents.engine.allocator import keep_freed_memory
from hertz_agents.engine.slots import SlotTable, masked_assign
from hertz_agents.model.hertz import Caches, HertzModel
from hertz_agents.model.kv_cache import ring_index
from hertz_agents.sampling import SamplingNoise, SamplingSettings, SamplingTensors

if TYPE_CHECKING:
    from hertz_agents.engine.prompt import PromptPrefill

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 16


def length_buckets(context: int) -> list[int]:
    """Attention lengths a cache is read at: powers of two from 16, and the context itself."""
    buckets, b = [], SMALLEST_BUCKET
    while b < context:
        buckets.append(b)
        b *= 2
    return buckets + [context]


def bucket_for(needed: int, buckets: list[int]) -> int:
    """Return the smallest bucket in ``buckets`` that holds ``needed`` positions."""
    return next(b for b in buckets if b >= needed)


def feed(
    model: HertzModel,
    caches: Caches,
    latents: Tensor,
    positions: Tensor,
    next_tokens: Tensor,
    length: int | None = None,
) -> None:
    """Prefill: write the keys and values of ``latents`` [B, T, C*32] at ``positions`` [B, T].

    ``next_tokens`` [B, C]: the tokens of the latent after the last one (its code is what the
    resynthesizer's last position sees).
    """
    model.ar(latents, positions, caches.ar, last_only=True, heads=(), length=length)
    model.resynthesizer(
        latents, next_tokens, positions, caches.resynthesizer, last_only=True, length=length
    )


class Stepper:
    """Owns a :class:`SlotTable` and every computation on it.

    Args:
        model: the model (two-channel for live ticks).
        slots: conversations held at once.
        context: positions per conversation before a rollover (default: the model's training
            length, ``seq_len``; a longer one is allowed, with a warning).
        keep: latents kept at a rollover (default 3/4 of the context).
        channels: channels whose predictions are computed (default: the model's own channel of a
            duplex model; offline generation passes all).
        kv_dtype: KV cache storage dtype (``torch.int8`` for quantized caches).
        batch_channels: run the computed channels' resynthesizer layers as one batch (False:
            one after the other, each rounded exactly as when it runs alone).
        compile: ``torch.compile`` the tick, the advance and the shadow fill with
            ``fullgraph=True`` (CUDA graphs on CUDA); a backend name picks another backend.
        rollover: ``"refill"`` or ``"ring"`` (see the module's docstring); default: the model's
            own (``config.serving.rollover``: ``"refill"`` for hertz-dev, ``"ring"`` for
            hertz-small).
        sink: with ``rollover="ring"``, the first positions of a call that stay in its cache.
    """

    def __init__(
        self,
        model: HertzModel,
        slots: int,
        context: int | None = None,
        keep: int | None = None,
        *,
        channels: tuple[int, ...] | None = None,
        kv_dtype: torch.dtype | None = None,
        compile: bool | str = False,
        batch_channels: bool = True,
        rollover: str | None = None,
        sink: int = 0,
    ) -> None:
        rollover = rollover or model.config.serving.rollover
        if rollover not in ROLLOVERS:
            raise ValueError(f"rollover must be one of {ROLLOVERS}, not {rollover!r}")
        if sink and rollover != "ring":
            raise ValueError(
                f"sink ({sink}) pins positions in a ring cache, and this stepper's rollover is "
                f"{rollover!r}: pass rollover='ring' or no sink"
            )
        trained = usable_context(model.config)
        self.context = context or trained
        if self.context > trained:  # allowed (rotary positions extend), but out of training
            log.warning(
                "context %d is past the %d positions the model was trained on (seq_len): its "
                "predictions there are out of its training (docs/engine.md)",
                self.context,
                trained,
            )
        self.keep = keep or (self.context * 3) // 4
        if not 1 < self.keep < self.context:
            raise ValueError(
                f"keep ({self.keep}) must be between 2 and the context ({self.context})"
            )
        # Enough positions per tick to finish the window between two rollovers, plus one spare.
        self.chunk = math.ceil(self.keep / (self.context - self.keep)) + 1
        if self.keep + self.chunk > self.context:
            raise ValueError(
                f"keep ({self.keep}) is too close to the context ({self.context}) to roll over"
            )
        self.model, self.batch_channels = model, batch_channels
        self.channels = channels or ((1,) if model.config.split else (0,))
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.latent_dim = model.config.codec.latent_dim
        self.table = SlotTable(
            model,
            slots,
            self.context,
            self.device,
            self.dtype,
            channels=self.channels,
            shadow_len=0 if rollover == "ring" else self.keep + self.chunk,
            kv_dtype=kv_dtype,
        )
        self.rollover, self.ring, self.sink = rollover, rollover == "ring", sink
        for rotary in self._rotaries():
            rotary.extend(self.context)
        if self.ring:
            if not 0 <= sink <= self.context // 2:
                raise ValueError(
                    f"sink ({sink}) must be between 0 and half the context "
                    f"({self.context // 2} positions)"
                )
            self.table.caches.as_ring(sink)
            self.lap = self.context - sink
            # a row is rebased once it is a lap past the context, one row a tick: the table has
            # a lap of margin for rows waiting their turn
            self.rotary_positions = self.context + 2 * self.lap
            for rotary in self._rotaries():
                rotary.extend(self.rotary_positions)
        self.buckets = length_buckets(self.context)
        self.rollovers = 0
        self.fill_calls = 0  # shadow fill forwards so far
        self._compiled = bool(compile)
        self._live, self._advance, self._fill = self._live_core, self._advance_core, self._fill_core
        if compile:
            self._compile("inductor" if compile is True else compile)
        if self.device.type == "cpu":
            # a CPU tick frees and reallocates megabytes of codec buffers; without this glibc
            # returns them to the kernel and the next tick faults them in again (allocator.py)
            keep_freed_memory()

    def _compile(self, backend: str) -> None:
        cuda = self.device.type == "cuda"
        if cuda:  # CUDA graphs replay fixed addresses: the state tensors must never move
            for tensor in self.table.state_tensors():
                torch._dynamo.mark_static_address(tensor)
        options = {"fullgraph": True, "dynamic": False, "backend": backend}
        if cuda and backend == "inductor":
            options["mode"] = "reduce-overhead"
        self._live = torch.compile(self._live_core, **options)
        self._advance = torch.compile(self._advance_core, **options)
        self._fill = torch.compile(self._fill_core, **options)

    # -- host-side state ------------------------------------------------------------------
    def position(self, slot: int) -> int:
        """Return the position ``slot`` has reached (host-side, no device sync)."""
        return self.table.host_positions[slot]

    def bytes_per_slot(self) -> int:
        """Return the memory one conversation holds: KV and shadow caches, history, codec state."""
        return self.table.bytes_per_slot()

    def jump_to(self, slot: int, position: int) -> None:
        """Put ``slot`` at ``position`` as if a call had got there.

        For timing: the caches hold whatever they held, and its shadow counts as filled as far as
        it could be.
        """
        if self.ring and position >= self.context:  # the same place in the ring, rebased
            position = self.context + (position - self.context) % self.lap
        self.table.set_position(slot, position)
        if not self.ring:
            self.table.shadow_filled[slot] = self._available(slot)

    @torch.no_grad()
    def prefill(self, slot: int, latents: Tensor, next_tokens: Tensor) -> None:
        """Write ``latents`` [T, C*latent] at positions 0..T-1 of ``slot``.

        The last one's next tokens [C] are given (they were sampled, or come from the prompt's
        next latent).
        """
        t = self.table
        positions = torch.arange(latents.shape[0], device=latents.device)[None]
        feed(self.model, t.caches.rows(1, start=slot), latents[None], positions, next_tokens[None])
        t.history[slot, : latents.shape[0]] = latents
        t.set_position(slot, latents.shape[0])
        t.last_tokens[slot] = next_tokens[list(self.channels)]
        t.shadow_filled[slot] = 0

    # -- steps ----------------------------------------------------------------------------
    @torch.no_grad()
    def tick(
        self,
        rows: int,
        active: Tensor,
        audio: Tensor,
        sampling: SamplingTensors | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> Tensor:
        """Live step of slots ``0..rows-1``, for real where ``active`` (host bool [rows]).

        Caller audio [rows, hop] -> the model's audio [rows, hop]. ``sampling`` overrides the
        slots' preallocated settings (:meth:`set_sampling`).
        """
        length, mask, noise, sampling = self._prepare(rows, 1, active, sampling, generators)
        out = self._live(rows, length, mask, audio[:rows], noise, sampling)
        self._after(rows, 1, active)
        return out

    @torch.no_grad()
    def advance(
        self,
        latents: Tensor,
        active: Tensor,
        sampling: SamplingTensors | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Feed ``latents`` [rows, T, C*latent] to slots 0..rows-1 and sample what comes next.

        Slots are fed for real where ``active``. Returns the next latents
        [rows, len(channels)*latent] and tokens [rows, len(channels)].
        """
        rows, steps = latents.shape[:2]
        if self.ring and steps > 1 and max(self.table.host_positions[:rows]) + steps > self.context:
            # a chunk that wraps would overwrite keys its own earlier positions still see
            out = None
            for step in range(steps):
                out = self.advance(latents[:, step : step + 1], active, sampling, generators)
            assert out is not None
            return out
        length, mask, noise, sampling = self._prepare(rows, steps, active, sampling, generators)
        out = self._advance(rows, length, mask, latents, noise, sampling)
        self._after(rows, steps, active)
        return out

    def set_sampling(self, slot: int, settings: SamplingSettings) -> None:
        """Set the sampling settings ``slot`` uses when a step does not override them."""
        self.table.set_sampling(slot, settings)

    def reset(self, slot: int, model_latent: Tensor, prompt: PromptPrefill | None = None) -> None:
        """Start a conversation in ``slot``: fresh, or continuing a prompt's prefill."""
        self.table.reset(slot, model_latent)
        if prompt is not None:
            prompt.apply(self.table, slot)

    def _prepare(self, rows: int, steps: int, active: Tensor, sampling, generators):
        t = self.table
        if self.ring:
            self._rebase_rings(rows, steps)
        else:
            for slot in range(rows):
                if t.host_positions[slot] + steps > self.context:
                    self._rollover(slot)
        needed = max(t.host_positions[:rows]) + steps
        length = bucket_for(min(needed, self.context), self.buckets)
        c = self.model.config
        noise = SamplingNoise.draw(
            generators,
            rows,
            c.channels,
            c.ar.vocab_size,
            c.resynthesizer.gmm_components,
            self.latent_dim,
            self.device,
        )
        if sampling is None:
            sampling = t.sampling.rows(rows)
        return length, active.to(self.device, non_blocking=True), noise, sampling

    def _after(self, rows: int, steps: int, active: Tensor) -> None:
        t = self.table
        for slot in active.nonzero().flatten().tolist():
            before = t.host_positions[slot]
            t.host_positions[slot] += steps
            if self.ring:
                self.rollovers += self._laps(before + steps) - self._laps(before)
        if not self.ring:
            self._fill_shadows(rows)

    def _live_core(
        self,
        rows: int,
        length: int,
        active: Tensor,
        audio: Tensor,
        noise: SamplingNoise,
        sampling: SamplingTensors,
    ) -> Tensor:
        t, codec = self.table, self.model.codec
        mu, encoder_state = codec.encode_step(
            audio[:, None, :].to(self.dtype), [s[:rows] for s in t.encoder_state]
        )
        for state, new in zip(t.encoder_state, encoder_state):
            masked_assign(state[:rows], new, active)
        x = torch.cat((mu, t.model_latent[:rows, None]), dim=-1)  # [rows, 1, 2 * latent]
        next_latents, _ = self._advance_core(rows, length, active, x, noise, sampling)
        own = self.channels.index(1) * self.latent_dim  # the model's channel among those computed
        model_next = next_latents[:, own : own + self.latent_dim]
        masked_assign(t.model_latent[:rows], model_next, active)
        out, decoder_state = codec.decode_step(
            model_next[:, None], [s[:rows] for s in t.decoder_state]
        )
        for state, new in zip(t.decoder_state, decoder_state):
            masked_assign(state[:rows], new, active)
        return out[:, 0]

    def _advance_core(
        self,
        rows: int,
        length: int,
        active: Tensor,
        x: Tensor,
        noise: SamplingNoise,
        sampling: SamplingTensors,
    ) -> tuple[Tensor, Tensor]:
        t, steps = self.table, x.shape[1]
        positions = t.positions[:rows, None] + torch.arange(steps, device=x.device)  # [rows, T]
        batch = torch.arange(rows, device=x.device)[:, None]
        index = ring_index(positions, self.sink, self.context) if self.ring else positions
        t.history[batch, index] = x.to(t.history.dtype)
        next_latents, tokens = self.model.next_latents(
            x,
            positions,
            t.caches.rows(rows),
            None,
            sampling,
            noise=noise,
            length=length,
            batch_channels=self.batch_channels,
        )
        masked_assign(t.last_tokens[:rows], tokens, active)
        t.positions[:rows].add_(active.long() * steps)
        return next_latents, tokens

    # -- rollover ---------------------------------------------------------------------------
    def _rotaries(self):
        return (self.model.ar.rotary, self.model.resynthesizer.rotary)

    def _laps(self, position: int) -> int:
        """Laps a ring has begun by ``position`` (a rollover each).

        Counted within a step, and rebases happen between steps.
        """
        if position < self.context:
            return 0
        return 1 + (position - self.context) // self.lap

    def _rebase_rings(self, rows: int, steps: int) -> None:
        """Turn back by a lap the furthest row that is a lap past the context.

        Also any row that would otherwise run out of rotary positions this step.
        """
        t = self.table
        due = [s for s in range(rows) if t.host_positions[s] >= self.context + self.lap]
        if not due:
            return
        furthest = max(due, key=lambda s: t.host_positions[s])
        for slot in due:
            if slot == furthest or t.host_positions[slot] + steps > self.rotary_positions:
                self._rebase(slot)

    def _rebase(self, slot: int) -> None:
        """Move ``slot``'s ring keys and position back by one lap; its sink stays."""
        caches = self.table.caches
        ar_turn, resynth_turn = (rotary.turn(-self.lap) for rotary in self._rotaries())
        caches.ar.turn_keys(slot, self.sink, *ar_turn)
        caches.resynthesizer.shared.turn_keys(slot, self.sink, *resynth_turn)
        caches.resynthesizer.split.turn_keys(slot, self.sink, *resynth_turn)
        self.table.set_position(slot, self.table.host_positions[slot] - self.lap)

    def _window_start(self) -> int:
        """History index of the first latent the next rollover keeps."""
        return self.context - self.keep

    def _available(self, slot: int) -> int:
        """Return the number of shadow positions whose inputs are known.

        Those are latent j and, for its code, latent j + 1 (the last position takes the last
        sampled tokens instead, known once the context is full).
        """
        position = self.table.host_positions[slot]
        if position >= self.context:
            return self.keep
        return max(0, min(position - self._window_start() - 1, self.keep - 1))

    def _fill_shadows(self, rows: int, force: bool = False) -> None:
        """Prefill the next ``chunk`` positions of the shadows that are due, as one forward.

        A row is due once ``chunk`` more of its window's latents are known (before the first
        rollover: one fill every ``chunk`` ticks), when the last ones are (at the rollover
        tick), or when it would otherwise not finish by its rollover. The fill's cost is mostly
        per forward on a CPU, not per position, so whole chunks are filled, each position once
        (but the last of a window); ``chunk`` is at most the rate that finishes the window
        between two rollovers, so it is a bounded slice of a tick, never a burst. The rows
        filled are the contiguous range of those due (all rows when compiled, so the shapes
        stay static); the others write into spare positions past the window. ``force``: every
        row with known latents left to fill is due.
        """
        t = self.table
        due = []
        for slot in range(rows):
            filled, available = t.shadow_filled[slot], self._available(slot)
            if filled >= available:
                continue
            ticks_left = self.context - t.host_positions[slot]  # fills after this one
            if (
                force
                or available - filled >= self.chunk
                or available == self.keep
                or self.keep - filled > ticks_left * self.chunk
            ):
                due.append(slot)
        if not due:
            return
        first, last = (0, rows - 1) if self._compiled else (due[0], due[-1])
        starts, needed = [], 0
        for slot in range(first, last + 1):
            if slot in due:
                filled = t.shadow_filled[slot]
                starts.append(filled)
                needed = max(needed, filled + self.chunk)
                t.shadow_filled[slot] = min(filled + self.chunk, self._available(slot))
            else:
                starts.append(self.keep)  # writes into the spare positions past the window
        length = min(bucket_for(needed, self.buckets), self.keep + self.chunk)
        self.fill_calls += 1
        self._fill(first, len(starts), length, torch.tensor(starts, device=self.device))

    def _fill_core(self, first: int, rows: int, length: int, starts: Tensor) -> None:
        """Prefill ``chunk`` shadow positions from ``starts`` [rows] of slots ``first``.. ."""
        t, model = self.table, self.model
        assert t.shadow is not None
        slots = slice(first, first + rows)
        positions = starts[:, None] + torch.arange(
            self.chunk, device=starts.device
        )  # [rows, chunk]
        source = (positions + self._window_start()).clamp(max=self.context - 1)
        batch = torch.arange(first, first + rows, device=starts.device)[:, None]
        latents = t.history[batch, source]
        following = t.history[batch, (source + 1).clamp(max=self.context - 1)].chunk(
            model.channels, dim=-1
        )
        resynth = model.resynthesizer
        codes = []
        for n, ch in enumerate(self.channels):
            code, _ = resynth.quantizer(following[ch])
            last = resynth.quantizer.embed_tokens(t.last_tokens[slots, n : n + 1]).to(code.dtype)
            codes.append(torch.where((positions == self.keep - 1)[..., None], last, code))
        shadow = t.shadow.rows(rows, start=first)
        model.ar(latents, positions, shadow.ar, last_only=True, heads=(), length=length)
        resynth(
            latents,
            None,
            positions,
            shadow.resynthesizer,
            True,
            codes=torch.stack(codes),
            length=length,
            batch_channels=self.batch_channels,
        )

    def _rollover(self, slot: int) -> None:
        """The context is full: the shadow holds the last ``keep`` latents at 0..keep-1."""
        t = self.table
        while t.shadow_filled[slot] < self.keep:  # only when the slot did not step to get here
            log.warning(
                "slot %d rolls over with its shadow cache unfinished; finishing it now", slot
            )
            self._fill_shadows(slot + 1, force=True)
        assert t.shadow is not None
        t.caches.copy_prefix(slot, t.shadow, self.keep, source_slot=slot)
        start = self._window_start()
        t.history[slot, : self.keep] = t.history[slot, start : start + self.keep].clone()
        t.set_position(slot, self.keep)
        t.shadow_filled[slot] = 0
        self.rollovers += 1
