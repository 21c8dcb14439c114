"""The engine in its own process, seen from the server's front end as a :class:`Backend`.

As vLLM's engine-core process does, ``hertz-agents serve`` runs the model in a process of its
own (``engine_child.py``) and keeps the WebSocket protocol in the front end, so no amount of
protocol work (a flood of messages, thousands of refused connections) can take the engine's
GIL: the engine steps its sessions on time whatever the clients do. :class:`EngineProcess`
satisfies :class:`~hertz_agents.backend.Backend` and ``BackendStats``, so the server's
connections and ``LoopSlot`` use it exactly as they use an in-process ``Engine``.

Per step the front end writes one frame (header and float32 audio) and reads one frame per
batched tick (every session's output); a reader thread hands each output to its slot's
``on_output``, as the engine's own thread would. If the engine process dies, every slot is ended
with the reason (``on_closed``) and :attr:`EngineProcess.alive` turns false (``/healthz`` and
``/readyz`` say so).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from hertz_agents.backend import ClosedCallback, OutputCallback, PromptSource, StepInfo
from hertz_agents.errors import AudioInputError, EngineFull, HertzError, SessionClosed
from hertz_agents.metrics import SessionMetrics
from hertz_agents.sampling import SamplingSettings
from hertz_agents.server.engine_child import engine_main
from hertz_agents.server.engine_wire import (
    AUDIO_BYTES,
    COUNT,
    OUTPUT,
    SUBMIT,
    EngineSpec,
    Kind,
)
from hertz_agents.timing import SAMPLES_PER_STEP

__all__ = ["EngineProcess", "ProcessSlot"]

log = logging.getLogger(__name__)

QUIT_TIMEOUT = 10.0  # for the engine process to close its engine and exit
_OPEN_ERRORS: dict[str, type[HertzError]] = {
    "EngineFull": EngineFull,
    "SessionClosed": SessionClosed,
    "AudioInputError": AudioInputError,
}


class ProcessSlot:
    """One session's slot in the engine process. ``submit`` and ``close`` are thread-safe."""

    def __init__(
        self,
        owner: EngineProcess,
        slot_id: int,
        on_output: OutputCallback,
        on_closed: ClosedCallback | None,
        sampling: SamplingSettings,
    ) -> None:
        self._owner, self.slot_id = owner, slot_id
        self._on_output, self._on_closed = on_output, on_closed
        self._sampling = sampling
        self._seqs = itertools.count()  # the engine numbers the same steps the same way
        self._engine_dropped = 0  # the engine's count of dropped input steps, last heard
        self.metrics = SessionMetrics()
        self.opened_at = time.monotonic()
        self.closed = False

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings in effect."""
        return self._sampling

    def submit(self, audio: np.ndarray, complete_at: float | None = None) -> int:
        """Queue one input step (float32 ``[2000]`` at 16 kHz); returns its sequence number."""
        if self.closed:
            raise SessionClosed("this session is closed; open a new one")
        if audio.shape != (SAMPLES_PER_STEP,):
            raise ValueError(
                f"an input step is {SAMPLES_PER_STEP} samples, got shape {audio.shape}"
            )
        seq = next(self._seqs)
        when = time.monotonic() if complete_at is None else complete_at
        header = Kind.SUBMIT + SUBMIT.pack(self.slot_id, seq, when)
        self._owner.send(header + np.ascontiguousarray(audio, np.float32).tobytes())
        return seq

    def update_sampling(self, sampling: SamplingSettings) -> None:
        """Use ``sampling`` from the next step on."""
        self._sampling = sampling
        with contextlib.suppress(SessionClosed):  # the slot is ending: on_closed says why
            self._owner.send(Kind.SAMPLING + pickle.dumps((self.slot_id, sampling)))

    def close(self) -> None:
        """Free the slot. Idempotent, never blocks."""
        if not self.closed:
            self.closed = True
            self._owner.release(self)

    # -- from the reader thread -------------------------------------------------------------
    def output(self, frame: bytes, offset: int) -> None:
        """One output step, an OUTPUT record at ``offset`` of ``frame``, to the session."""
        _, step, seq, queue_ms, compute_ms, complete, dropped, silence = OUTPUT.unpack_from(
            frame, offset
        )
        if self.closed:
            return
        audio = np.frombuffer(frame, np.float32, SAMPLES_PER_STEP, offset + OUTPUT.size).copy()
        now = time.monotonic()
        self.metrics.dropped_input_steps += dropped - self._engine_dropped
        self._engine_dropped = dropped
        self.metrics.record_step(compute_ms, queue_ms, (now - complete) * 1000, silence)
        if self.metrics.ttfa_ms is None:
            self.metrics.ttfa_ms = (now - self.opened_at) * 1000
        info = StepInfo(step, silence, None if seq < 0 else seq, queue_ms, compute_ms, complete)
        try:
            self._on_output(audio, info)
        except Exception:
            log.exception("a session's output callback failed; closing that session")
            self.close()

    def ended(self, error: BaseException) -> None:
        """The engine (or its process) ended this slot: tell the session."""
        if self.closed:
            return
        self.closed = True
        if self._on_closed is not None:
            try:
                self._on_closed(error)
            except Exception:
                log.exception("a session's on_closed callback failed")


class EngineProcess:
    """A :class:`~hertz_agents.backend.Backend` whose engine runs in a child process.

    Starting blocks until the model is loaded and the prompts are prefilled there.

    Args:
        spec: What the engine process loads.
        start_timeout: Seconds to wait for it to be ready.

    Raises:
        HertzError: The engine could not start (the message is the engine process's reason).
    """

    def __init__(self, spec: EngineSpec, *, start_timeout: float = 600.0) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=engine_main, args=(child_conn, spec), name="hertz-engine", daemon=True
        )
        self._process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._slots: dict[int, ProcessSlot] = {}
        self._opening: dict[int, tuple[Future[ProcessSlot], ProcessSlot]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._running = True
        self._stopped_reason = ""
        self.ticks = 0
        self.tick_sizes: deque[int] = deque(maxlen=512)
        self._engine_alive = True
        ready = self._wait_ready(start_timeout)
        self.max_sessions: int = ready["max_sessions"]
        self._bytes_per_session: int = ready["bytes_per_session"]
        self._reader = threading.Thread(target=self._read, name="hertz-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float) -> dict:
        if not self._conn.poll(timeout):
            self._process.kill()
            raise HertzError(f"the engine process did not start within {timeout:g} s")
        try:
            frame = self._conn.recv_bytes()
        except (EOFError, OSError):
            self._process.join(5)
            raise HertzError(
                f"the engine process exited while starting (exit code {self._process.exitcode}); "
                "its log above says why"
            ) from None
        if frame[:1] == Kind.FAILED:
            self._process.join(5)
            raise HertzError(pickle.loads(frame[1:]))
        return pickle.loads(frame[1:])

    # -- Backend -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._process.pid

    @property
    def active_sessions(self) -> int:
        """Slots in use now (opening ones included)."""
        return len(self._slots) + len(self._opening)

    @property
    def occupancy(self) -> float:
        """Share of slots in use, 0..1."""
        return self.active_sessions / self.max_sessions

    @property
    def alive(self) -> bool:
        """The engine process runs and its engine thread steps."""
        return self._running and self._engine_alive and self._process.is_alive()

    def bytes_per_session(self) -> int:
        """Device memory one slot holds in the engine process."""
        return self._bytes_per_session

    def open(
        self,
        on_output: OutputCallback,
        *,
        sampling: SamplingSettings | None = None,
        prompt: PromptSource | None = None,
        seed: int | None = None,
        on_closed: ClosedCallback | None = None,
    ) -> ProcessSlot:
        """Take a slot (blocking: the engine process prefills a new prompt)."""
        sampling = sampling or SamplingSettings()
        future: Future[ProcessSlot] = Future()
        with self._lock:
            if not self._running:
                raise SessionClosed(self._stopped_reason or "the engine is closed")
            slot_id = next(self._ids)
            slot = ProcessSlot(self, slot_id, on_output, on_closed, sampling)
            self._opening[slot_id] = (future, slot)
        if isinstance(prompt, Path):
            prompt = str(prompt)
        try:
            self.send(Kind.OPEN + pickle.dumps((slot_id, sampling, prompt, seed)))
        except SessionClosed as e:
            self._stopped(str(e))
        return future.result()

    def send(self, frame: bytes) -> None:
        """Write one frame to the engine process (any thread).

        Raises:
            SessionClosed: The engine process is gone (the reader thread ends every slot).
        """
        try:
            with self._send_lock:
                self._conn.send_bytes(frame)
        except OSError:
            raise SessionClosed(self._stopped_reason or "the engine process is gone") from None

    def release(self, slot: ProcessSlot) -> None:
        """A slot was closed by its session: free it in the engine."""
        with self._lock:
            known = self._slots.pop(slot.slot_id, None) is not None
        if known and self._running:
            with contextlib.suppress(SessionClosed):  # gone: the reader thread reports it
                self.send(Kind.CLOSE + pickle.dumps(slot.slot_id))

    def inject_stall(self, seconds: float) -> None:
        """Fault injection for tests and drills: the engine's next tick takes longer."""
        self.send(Kind.STALL + pickle.dumps(seconds))

    # -- the reader thread -------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                frame = self._conn.recv_bytes()
            except (EOFError, OSError):
                break
            kind = frame[:1]
            if kind == Kind.OUTPUTS:
                (count,) = COUNT.unpack_from(frame, 1)
                offset = 1 + COUNT.size
                record = OUTPUT.size + AUDIO_BYTES
                for _ in range(count):
                    slot_id = OUTPUT.unpack_from(frame, offset)[0]
                    slot = self._slots.get(slot_id)
                    if slot is not None:
                        slot.output(frame, offset)
                    offset += record
            elif kind == Kind.OPENED:
                self._opened(*pickle.loads(frame[1:]))
            elif kind == Kind.ENDED:
                slot_id, message = pickle.loads(frame[1:])
                with self._lock:
                    slot = self._slots.pop(slot_id, None)
                if slot is not None:
                    slot.ended(SessionClosed(message))
            elif kind == Kind.STATS:
                stats = pickle.loads(frame[1:])
                self._engine_alive = stats["alive"]
                self.ticks = stats["ticks"]
                self.tick_sizes = deque(stats["tick_sizes"], maxlen=512)
        if self._running:
            self._process.join(1.0)
            code = self._process.exitcode
            log.error("the engine process stopped (exit code %s)", code)
            self._stopped(
                f"the engine process stopped (exit code {code}); this server takes no calls "
                "until it is restarted"
            )

    def _opened(self, slot_id: int, error: str | None, message: str) -> None:
        with self._lock:
            future, slot = self._opening.pop(slot_id, (None, None))
            if future is None or slot is None:
                return
            if error is None:
                self._slots[slot_id] = slot
        if error is None:
            future.set_result(slot)
        else:
            future.set_exception(_OPEN_ERRORS.get(error, HertzError)(message))

    def _stopped(self, reason: str) -> None:
        """End every slot and every open in progress with ``reason``."""
        with self._lock:
            self._running = False
            self._stopped_reason = reason
            slots, self._slots = list(self._slots.values()), {}
            opening, self._opening = list(self._opening.values()), {}
        for future, _ in opening:
            if not future.done():
                future.set_exception(SessionClosed(reason))
        for slot in slots:
            slot.ended(SessionClosed(reason))

    def close(self) -> None:
        """Close every slot, stop the engine process. Safe to call twice."""
        if self._running:
            self._stopped("the engine was closed")
            with contextlib.suppress(SessionClosed):
                self.send(Kind.QUIT)
        self._process.join(QUIT_TIMEOUT)
        if self._process.is_alive():
            log.warning("the engine process did not exit in %.0f s; killing it", QUIT_TIMEOUT)
            self._process.kill()
            self._process.join(5)
        self._conn.close()
        self._reader.join(timeout=2)
