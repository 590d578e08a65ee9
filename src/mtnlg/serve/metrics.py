"""Prometheus metrics of the server: load, token counts and latencies, as `GET /metrics` shows them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from mtnlg.inference.engine import Engine, Request
    from mtnlg.serve.runner import Listener

# Seconds: from a few milliseconds (a GPU decode step) to minutes (a long answer on a laptop CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One registry per server, so that several servers in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mtnlg_requests_running", "HTTP requests in progress", registry=r)
        self.waiting = Gauge("mtnlg_sequences_waiting", "Sequences waiting for a slot", registry=r)
        self.slots_used = Gauge("mtnlg_slots_used", "KV-cache slots in use", registry=r)
        self.prompt_tokens = Counter("mtnlg_prompt_tokens", "Prompt tokens of finished sequences", registry=r)
        self.reused_tokens = Counter("mtnlg_prompt_tokens_reused", "Prompt tokens not read: a slot held them", registry=r)
        self._reused = 0  # the engine's count when last seen
        self.generation_tokens = Counter("mtnlg_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("mtnlg_requests_finished", "Sequences finished, by reason", ["finish_reason"], registry=r)
        self.rejected = Counter("mtnlg_requests_rejected", "Requests refused because the queue was full", registry=r)
        self.ttft = Histogram("mtnlg_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mtnlg_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mtnlg_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r)

    def observe_engine(self, engine: Engine) -> None:
        self.slots_used.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.reused_tokens.inc(engine.reused - self._reused)
        self._reused = engine.reused

    def observe_tokens(self, listener: Listener, now: float, count: int) -> None:
        if listener.last is None:
            self.ttft.observe(now - listener.arrived)
        else:
            self.itl.observe((now - listener.last) / count)
        listener.last = now
        self.generation_tokens.inc(count)

    def observe_finish(self, listener: Listener, now: float, request: Request) -> None:
        self.e2e.observe(now - listener.arrived)
        self.requests.labels(request.finish).inc()
        self.prompt_tokens.inc(len(request.prompt))

    def render(self) -> bytes:
        return generate_latest(self.registry)
