"""The serving engine: one thread runs a `BatchedGenerator`; clients on any thread submit and receive events.

Each request gets a sink (a callable) that receives its `GenerationEvent`s in order, then one
`RequestEnd`. Encoding a request (images included) happens on the submitting thread, so that a
bad request fails there and costs the batch nothing. Other work that needs the model or the
image decoder (rendering a caption alone) runs on the engine thread between decoding steps, so
that nothing runs the model or the decoder concurrently.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from textbind.batch_generation import BatchedGenerator, BatchRequest, PreparedRequest
from textbind.data.conversation import Conversation
from textbind.generation import DecodingConfig, GenerationEvent, InterleavedGenerator

logger = logging.getLogger(__name__)


@dataclass
class RequestEnd:
    """The last thing a sink receives: why the request ended, and how many tokens it sampled."""

    completion_tokens: int
    error: BaseException | None = None  # None: finished (its DoneEvent came before) or cancelled
    cancelled: bool = False


EventSink = Callable[[GenerationEvent | RequestEnd], None]


class RequestHandle:
    """A submitted request: `cancel()` ends it at the next step (its sink then gets a RequestEnd)."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """Continuous batching over one model: up to `max_batch_size` answers decode together."""

    def __init__(self, generator: InterleavedGenerator, max_batch_size: int = 8) -> None:
        self.generator = generator
        self.batched = BatchedGenerator(generator, max_batch_size)
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._active: list[tuple[BatchRequest, RequestHandle, EventSink]] = []
        self._stopping = threading.Event()
        # Requests are encoded on the clients' threads; one at a time, as a tokenizer is not promised to be
        # thread-safe (the engine thread itself only decodes).
        self._prepare_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="textbind-engine", daemon=True)
        self._thread.start()

    @property
    def max_length(self) -> int:
        return self.generator.max_length

    # What a client of the engine reads of the model (the demo counts tokens and shrinks uploads with them).
    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.generator.image_processor

    def prepare(
        self, conversation: Conversation, config: DecodingConfig, *, render_images: bool = True
    ) -> PreparedRequest:
        """Check and encode a request (raises DataError); any thread."""
        with self._prepare_lock:
            return self.batched.prepare(conversation, config, render_images=render_images)

    def submit(self, prepared: PreparedRequest, sink: EventSink) -> RequestHandle:
        handle = RequestHandle(len(prepared.prompt_ids))
        self._inbox.put(("request", prepared, handle, sink))
        return handle

    def run_job(self, job: Callable[[], Any]) -> Future:
        """Run `job` on the engine thread between steps; its result (or exception) arrives in the Future."""
        future: Future = Future()
        self._inbox.put(("job", job, future))
        return future

    def stream(
        self, conversation: Conversation, config: DecodingConfig | None = None
    ) -> Iterator[GenerationEvent]:
        """The events of one answer, like `InterleavedGenerator.stream`, decoded in the shared batch."""
        prepared = self.prepare(conversation, (config or DecodingConfig()).validate())
        events: queue.Queue = queue.Queue()
        handle = self.submit(prepared, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, RequestEnd):
                    if event.error is not None:
                        raise RuntimeError(f"generation failed: {event.error}") from event.error
                    return
                yield event
        finally:
            handle.cancel()

    def statistics(self) -> dict[str, int]:
        """A snapshot for monitoring (read without a lock: numbers may be one step old)."""
        batched = self.batched
        return {"active": len(batched.rows), "waiting": len(batched.waiting), "max_batch_size": batched.max_batch_size,
                "steps": batched.steps, "peak_batch_size": batched.peak_batch_size}

    def close(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    # --- the engine thread --------------------------------------------------------------------------------

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = item[0]
            if kind == "request":
                _, prepared, handle, sink = item
                self._active.append((self.batched.add(prepared), handle, sink))
            elif kind == "job":
                _, job, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except BaseException as error:  # noqa: BLE001 - handed to the caller
                        future.set_exception(error)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._take_inbox(block=not self.batched.busy)
            for request, handle, _ in self._active:
                if handle.cancelled:
                    request.cancelled = True
            try:
                if self.batched.busy:
                    self.batched.step()
            except Exception as error:  # noqa: BLE001 - a shared step failed: fail its requests, keep serving
                logger.exception("a decoding step failed; %d request(s) fail with it", len(self._active))
                self.batched.cancel_all(error)
            self._deliver()
        for request, _, sink in self._active:
            _safely(sink, RequestEnd(len(request.answer.token_ids), RuntimeError("the server is shutting down")))

    def _deliver(self) -> None:
        still_active = []
        for request, handle, sink in self._active:
            for event in request.take_events():
                _safely(sink, event)
            if request.finished:
                _safely(sink, RequestEnd(len(request.answer.token_ids), request.error, request.cancelled))
            else:
                still_active.append((request, handle, sink))
        self._active = still_active


def _safely(sink: EventSink, event: GenerationEvent | RequestEnd) -> None:
    try:
        sink(event)
    except Exception:  # noqa: BLE001 - a client that went away must not stop the engine
        logger.debug("an event sink failed", exc_info=True)
