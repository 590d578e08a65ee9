"""The engine in a thread of its own, and the bridge between it and the server's event loop.

The engine thread is the only one that touches the model: it steps the engine while there is work, runs
other model calls (embeddings) between steps, and hands each request's progress to the event loop as
immutable events. The event loop only submits, cancels and listens, so a slow client never slows a step,
and an error in a step ends the requests of that step (with an error event), never the loop.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mtnlg.inference.engine import Engine, Request
from mtnlg.serve.metrics import Metrics


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass(frozen=True)
class Event:
    """What one step did for one request: new text (held back where a stop string may start), new tokens
    with their log-probabilities, and the finish reason once it is done."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list[dict[str, float]]
    finish: str | None


@dataclass(eq=False)
class Listener:
    """The event loop's end of one HTTP request: (sequence, event) pairs arrive on `queue`."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when the previous token came: inter-token latency
    emitted: int = 0  # tokens handed out


class EngineRunner:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._wake = threading.Condition()
        self._inbox: list[tuple[Request, Listener]] = []
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._listeners: dict[Request, Listener] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mtnlg-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, requests: list[Request], listener: Listener) -> None:
        """Queue a request's sequences (all of them or none); QueueFull when they do not fit."""
        with self._wake:
            waiting = len(self._inbox) + len(self.engine.waiting) + len(requests) - self.engine.slots.count(None)
            if waiting > self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull
            self._inbox += [(r, listener) for r in requests]
            self._wake.notify()

    def cancel(self, requests: list[Request]) -> None:
        """Free the requests' slots at the next step (a client went away)."""
        with self._wake:
            for r in requests:
                r.cancelled = True
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps (anything else that uses the model)."""
        future: Future = Future()
        with self._wake:
            self._jobs.append((fn, future))
            self._wake.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self._inbox or self._jobs or self.engine.has_work()):
                    self._wake.wait()
                if self._stopped:
                    return
                inbox, self._inbox = self._inbox, []
                jobs, self._jobs = self._jobs, []
            for request, listener in inbox:
                self._listeners[request] = listener
                try:
                    self.engine.add(request)
                except ValueError:  # the server checks lengths first; this is the engine's own guard
                    request.finish = "error"
                    self._deliver([self._event(request)])
            for fn, future in jobs:
                if not future.set_running_or_notify_cancel():  # its caller has gone
                    continue
                try:
                    future.set_result(fn())
                except Exception as e:  # the job's caller reports it
                    future.set_exception(e)
            try:
                changed = self.engine.step()
            except Exception:
                traceback.print_exc(file=sys.stderr)
                changed = self.engine.fail()
            self._deliver([self._event(request) for request in changed])
            self.metrics.observe_engine(self.engine)

    @staticmethod
    def _deliver(events: list[tuple[Listener, Request, Event] | None]) -> None:
        """Hand a step's events to the event loop in one wake-up (not one per request)."""
        events = [e for e in events if e is not None]
        if events:
            events[0][0].loop.call_soon_threadsafe(_put_all, events)

    def _event(self, request: Request) -> tuple[Listener, Request, Event] | None:
        listener = self._listeners.get(request)
        if listener is None:
            return None
        now = time.perf_counter()
        new = slice(listener.emitted, len(request.ids))
        if request.ids[new]:
            self.metrics.observe_tokens(listener, now, len(request.ids[new]))
        listener.emitted = len(request.ids)
        event = Event(request.delta(self.engine.tokenizer), request.ids[new], request.logprobs[new], request.top[new],
                      request.finish)
        if request.finish:
            del self._listeners[request]
            self.metrics.observe_finish(listener, now, request)
        return listener, request, event


def _put_all(events: list[tuple[Listener, Request, Event]]) -> None:
    for listener, request, event in events:
        listener.queue.put_nowait((request, event))
