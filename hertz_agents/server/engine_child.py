"""The engine process: it owns the model and the :class:`~hertz_agents.engine.Engine`.

:func:`engine_main` runs in a process the front end starts (``spawn``). It loads the model,
prefills the registered prompts, reports ready, then serves the front end's connection:

* the main thread reads frames and hands input steps to the engine's slots (never blocking);
* opens run on a small pool of threads, since a new prompt is prefilled there, so a start with a
  prompt never holds up other sessions' audio;
* the engine's thread queues each output step; a sender thread writes whatever is queued as one
  frame, so a batched tick costs the front end one read, whatever the number of sessions;
* a stats thread reports the engine's figures every ``STATS_SECONDS``.

It ignores SIGINT and SIGTERM: the front end drains its sessions first, then tells the engine to
quit (a terminal's Ctrl-C or a service manager's SIGTERM reaches every process of the group). It
exits when told to, or when the front end's end of the connection closes.
"""

from __future__ import annotations

import logging
import pickle
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from hertz_agents.errors import HertzError
from hertz_agents.server.engine_wire import COUNT, OUTPUT, SUBMIT, EngineSpec, Kind

log = logging.getLogger(__name__)

STATS_SECONDS = 0.5
OPEN_WORKERS = 2  # prefills at once; more would only share the same cores


def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The engine process's entry point (the target of ``multiprocessing.Process``)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = _load(spec)
    except HertzError as e:
        conn.send_bytes(Kind.FAILED + pickle.dumps(str(e)))
        return
    except Exception as e:  # an unexpected failure still gets its one line at the front end
        log.exception("the engine process could not start")
        conn.send_bytes(Kind.FAILED + pickle.dumps(f"{type(e).__name__}: {e}"))
        return
    _EngineHost(conn, engine).serve()


def _load(spec: EngineSpec):
    from hertz_agents.checkpoint import load_model
    from hertz_agents.commands.common import torch_dtype
    from hertz_agents.engine import Engine

    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    net = load_model(spec.model, device=spec.device, dtype=torch_dtype(spec.dtype))
    if spec.adapter is not None:
        from hertz_agents.lora import merge_adapter

        merge_adapter(net, spec.adapter)
    engine = Engine(net, **spec.engine_options)
    try:
        for path in spec.prompts:  # prefilled now, not during someone's call
            engine.prefill_prompt(path)
            log.info("prompt ready (%s)", path)
    except BaseException:
        engine.close()
        raise
    return engine


class _EngineHost:
    """The engine process's side of the connection: slots by the front end's ids."""

    def __init__(self, conn: Connection, engine: Any) -> None:
        self.conn, self.engine = conn, engine
        self.handles: dict[int, Any] = {}
        self._send_lock = threading.Lock()
        self._outputs: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._opens = ThreadPoolExecutor(OPEN_WORKERS, thread_name_prefix="hertz-open")
        self._done = threading.Event()

    def send(self, frame: bytes) -> None:
        with self._send_lock:
            self.conn.send_bytes(frame)

    def serve(self) -> None:
        """Report ready, then serve frames until told to quit or the front end goes away."""
        self.send(
            Kind.READY
            + pickle.dumps(
                {
                    "max_sessions": self.engine.max_sessions,
                    "bytes_per_session": self.engine.bytes_per_session(),
                }
            )
        )
        threads = [
            threading.Thread(target=self._send_outputs, name="hertz-outputs", daemon=True),
            threading.Thread(target=self._send_stats, name="hertz-stats", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._receive()
        finally:
            self._done.set()
            self.engine.close()
            self._outputs.put(None)
            self._opens.shutdown(wait=False, cancel_futures=True)
            for t in threads:
                t.join(timeout=2)

    def _receive(self) -> None:
        while True:
            try:
                frame = self.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the front end is gone
            try:
                if not self._dispatch(frame):
                    return
            except Exception:  # one bad frame must not stop every session's engine
                log.exception("an engine-process command failed")

    def _dispatch(self, frame: bytes) -> bool:
        """Act on one frame from the front end; False when told to quit."""
        kind = frame[:1]
        if kind == Kind.SUBMIT:
            slot_id, _, complete_at = SUBMIT.unpack_from(frame, 1)
            handle = self.handles.get(slot_id)
            if handle is not None and not handle.closed:
                audio = np.frombuffer(frame, np.float32, offset=1 + SUBMIT.size)
                handle.submit(audio, complete_at)
        elif kind == Kind.OPEN:
            self._opens.submit(self._open, *pickle.loads(frame[1:]))
        elif kind == Kind.SAMPLING:
            slot_id, sampling = pickle.loads(frame[1:])
            handle = self.handles.get(slot_id)
            if handle is not None:
                handle.update_sampling(sampling)
        elif kind == Kind.CLOSE:
            handle = self.handles.pop(pickle.loads(frame[1:]), None)
            if handle is not None:
                handle.close()
        elif kind == Kind.STALL:
            self.engine.inject_stall(pickle.loads(frame[1:]))
        elif kind == Kind.QUIT:
            return False
        return True

    def _open(self, slot_id: int, sampling: Any, prompt: Any, seed: int | None) -> None:
        opened: list[Any] = []  # the handle, once open returns (a step may come before that)

        def on_output(audio: np.ndarray, info: Any) -> None:
            dropped = opened[0].metrics.dropped_input_steps if opened else 0
            record = OUTPUT.pack(
                slot_id,
                info.step,
                -1 if info.input_seq is None else info.input_seq,
                info.queue_ms,
                info.compute_ms,
                info.input_complete,
                dropped,
                info.silence_input,
            )
            self._outputs.put(record + np.ascontiguousarray(audio, np.float32).tobytes())

        def on_closed(error: BaseException) -> None:
            self.handles.pop(slot_id, None)
            self._try_send(Kind.ENDED + pickle.dumps((slot_id, str(error))))

        try:
            handle = self.engine.open(
                on_output, sampling=sampling, prompt=prompt, seed=seed, on_closed=on_closed
            )
        except Exception as e:
            error = type(e).__name__ if isinstance(e, HertzError) else "RuntimeError"
            if not isinstance(e, HertzError):
                log.exception("opening a slot failed")
            self._try_send(Kind.OPENED + pickle.dumps((slot_id, error, str(e))))
            return
        opened.append(handle)
        self.handles[slot_id] = handle
        self._try_send(Kind.OPENED + pickle.dumps((slot_id, None, "")))

    def _try_send(self, frame: bytes) -> None:
        try:
            self.send(frame)
        except OSError:  # the front end is gone; the receive loop ends on its own
            pass

    def _send_outputs(self) -> None:
        """One frame for every output queued meanwhile (a whole tick, usually)."""
        while True:
            record = self._outputs.get()
            if record is None:
                return
            batch = [record]
            while True:
                try:
                    more = self._outputs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._outputs.put(None)
                    break
                batch.append(more)
            self._try_send(Kind.OUTPUTS + COUNT.pack(len(batch)) + b"".join(batch))

    def _send_stats(self) -> None:
        while not self._done.wait(STATS_SECONDS):
            stats = {
                "alive": self.engine.alive,
                "ticks": self.engine.ticks,
                "tick_sizes": list(self.engine.tick_sizes)[-512:],
            }
            self._try_send(Kind.STATS + pickle.dumps(stats))
