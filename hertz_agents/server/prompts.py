"""The prompts a server knows: named WAVs registered by its operator, and inline ones clients send.

A start message may name a prompt (``Prompt(name=...)``), carry a WAV inline
(``Prompt(audio=...)``), or leave it out (the server's default prompt, if it has one). The
catalogue turns that into what the engine takes, or refuses it with a ``ProtocolError`` saying why.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import numpy as np
import soundfile as sf

from hertz_agents.audio import read_audio
from hertz_agents.errors import AudioInputError
from hertz_agents.remote import protocol as p
from hertz_agents.timing import MIN_PROMPT_SECONDS

__all__ = ["MAX_PROMPT_CHANNELS", "MAX_PROMPT_RATE", "PromptCatalogue"]

MAX_PROMPT_CHANNELS = 2  # caller and model; more would only be dropped after decoding
MAX_PROMPT_RATE = 48_000  # with the duration cap: an inline prompt decodes to at most ~11 MB


class PromptCatalogue:
    """Named prompts, the default one, and the policy for inline prompts.

    Args:
        prompts: Name -> WAV, known to every client.
        default: The prompt for starts without one, and for compatibility sessions.
        allow_inline: Whether clients may send their own prompt audio.
        max_inline: Distinct inline prompts accepted (their prefills stay in the engine).
        max_prompt_bytes: The largest inline prompt file.
        max_prompt_seconds: The longest inline prompt, read from its header before decoding.
        max_inline_per_peer: Distinct inline prompts one peer address may add (0: no limit).
    """

    def __init__(
        self,
        prompts: dict[str, Path],
        *,
        default: str | None,
        allow_inline: bool,
        max_inline: int,
        max_prompt_bytes: int,
        max_prompt_seconds: float = 30.0,
        max_inline_per_peer: int = 0,
    ) -> None:
        if default is not None and default not in prompts:
            raise ValueError(
                f"the default prompt {default!r} is not one of the registered "
                f"prompts {sorted(prompts)}"
            )
        self.prompts = dict(prompts)
        self.default = default
        self.allow_inline = allow_inline
        self.max_inline = max_inline
        self.max_prompt_bytes = max_prompt_bytes
        self.max_prompt_seconds = max_prompt_seconds
        self.max_inline_per_peer = max_inline_per_peer
        self._inline_seen: set[str] = set()  # sha256 of each inline prompt accepted
        self._inline_by_peer: dict[str, set[str]] = {}  # who added which

    @property
    def names(self) -> list[str]:
        """The registered prompt names, sorted."""
        return sorted(self.prompts)

    def default_ref(self) -> p.Prompt | None:
        """The default prompt as a start message would name it (None: no default)."""
        return p.Prompt(name=self.default) if self.default else None

    async def resolve(self, prompt: p.Prompt | None, peer: str = "") -> Path | np.ndarray | None:
        """A start's prompt -> what the engine takes.

        Raises:
            p.ProtocolError: ``UNKNOWN_PROMPT`` or ``BAD_PROMPT``, with what to do instead.
        """
        prompt = prompt or self.default_ref()
        if prompt is None:
            return None
        if prompt.name is not None:
            path = self.prompts.get(prompt.name)
            if path is None:
                known = ", ".join(self.names) or "none"
                raise p.ProtocolError(
                    p.ErrorCode.UNKNOWN_PROMPT,
                    f"this server has no prompt named {prompt.name!r} (it knows: {known})",
                )
            return path
        return await self._inline(prompt.audio or b"", peer)

    async def _inline(self, audio: bytes, peer: str) -> np.ndarray:
        def refuse(message: str) -> p.ProtocolError:
            return p.ProtocolError(p.ErrorCode.BAD_PROMPT, message)

        if not self.allow_inline:
            raise refuse(
                "this server takes only named prompts; ask its operator to register "
                "yours with --prompt NAME=FILE"
            )
        if len(audio) > self.max_prompt_bytes:
            raise refuse(
                f"inline prompts are at most {self.max_prompt_bytes} bytes; register "
                "longer ones on the server"
            )
        digest = hashlib.sha256(audio).hexdigest()
        if digest not in self._inline_seen and len(self._inline_seen) >= self.max_inline:
            raise refuse(
                f"this server already holds {self.max_inline} different inline prompts, "
                "its limit; use one of its named prompts or register yours"
            )
        mine = self._inline_by_peer.get(peer, set())
        if digest not in self._inline_seen and 0 < self.max_inline_per_peer <= len(mine):
            raise refuse(
                f"this address already added {self.max_inline_per_peer} different inline "
                "prompts, its limit; reuse one of them or register yours on the server"
            )
        self._check_header(audio)
        try:
            array = await asyncio.to_thread(
                read_audio, io.BytesIO(audio), channels=2, min_seconds=MIN_PROMPT_SECONDS
            )
        except AudioInputError as e:
            raise refuse(f"the inline prompt cannot be read: {e}") from None
        if digest not in self._inline_seen:
            self._inline_seen.add(digest)
            self._inline_by_peer.setdefault(peer, set()).add(digest)
        return array

    def _check_header(self, audio: bytes) -> None:
        """Refuse from the file's header alone what would decode to too much memory.

        A compressed file can be tiny and decode to gigabytes (a minute of silence in FLAC is a
        few KB), so the size of the file says nothing: its header's duration, channels and rate do.
        """
        try:
            info = sf.info(io.BytesIO(audio))
        except (sf.SoundFileError, RuntimeError, TypeError) as e:
            # libsndfile names the in-memory buffer ("Error opening <_io.BytesIO ...>: ..."),
            # which tells the client nothing; its reason is the last part
            reason = str(e).rsplit(": ", 1)[-1]
            raise p.ProtocolError(
                p.ErrorCode.BAD_PROMPT,
                f"the inline prompt cannot be read as audio ({reason}); send a WAV or FLAC file",
            ) from None
        problems = []
        if info.channels > MAX_PROMPT_CHANNELS:
            problems.append(f"{info.channels} channels (at most {MAX_PROMPT_CHANNELS})")
        if info.samplerate > MAX_PROMPT_RATE:
            problems.append(f"{info.samplerate} Hz (at most {MAX_PROMPT_RATE})")
        # frames may be unknown (0 or huge) in a streamed header; then it counts as too long.
        if not 0 < info.frames <= self.max_prompt_seconds * info.samplerate:
            problems.append(
                f"{info.frames / max(info.samplerate, 1):.1f} s "
                f"(at most {self.max_prompt_seconds:g} s)"
            )
        if problems:
            raise p.ProtocolError(
                p.ErrorCode.BAD_PROMPT,
                f"the inline prompt is {', '.join(problems)}; send a shorter mono or stereo "
                "file, or register it on the server with --prompt",
            )
