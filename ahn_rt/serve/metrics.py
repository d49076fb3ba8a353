"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: no client library.

Histograms: time to first token (from the request's admission to the queue to its first sampled token,
so queueing and prefill are in it), inter-token latency (between consecutive sampled tokens of one
generation), request duration. Counters: prompt tokens, prompt tokens taken from the prefix cache,
generated tokens, generations by finish reason, HTTP requests by endpoint and status, prefix-cache hits,
misses, stores and evictions. Gauges: active sessions, queue depth, prefix-cache bytes and entries,
conversations held in memory.
"""
from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    return "+Inf" if v == float("inf") else repr(float(v))


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help = name, help
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float):
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip((*self.buckets, float("inf")), self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(le)}"}} {acc}')
        out += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """Thread-safe: the scheduler's worker observes tokens, the event loop counts requests."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram("ahn_rt_time_to_first_token_seconds",
                              "Time from a request's admission to its first sampled token.", TTFT_BUCKETS)
        self.itl = Histogram("ahn_rt_inter_token_latency_seconds",
                             "Time between consecutive sampled tokens of one generation.", ITL_BUCKETS)
        self.duration = Histogram("ahn_rt_request_duration_seconds",
                                  "Time from admission to the end of a generation.", DURATION_BUCKETS)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.finished_by: dict[str, int] = {}
        self.requests: dict[tuple, int] = {}
        self.sources: dict = {}

    # the scheduler's hooks
    def first_token(self, seconds: float, cached_tokens: int):
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float):
        with self._lock:
            self.itl.observe(seconds)

    def finished(self, run, reason: str, seconds: float | None = None):
        with self._lock:
            self.prompt_tokens += run.stats.prompt_tokens
            self.cached_tokens += run.stats.cached_tokens
            self.generation_tokens += run.stats.new_tokens
            self.finished_by[reason] = self.finished_by.get(reason, 0) + 1
            if seconds is not None:
                self.duration.observe(seconds)

    # the server's hook
    def request(self, endpoint: str, status: int):
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, scheduler=None, prefix_cache=None, sessions=None) -> str:
        lines: list[str] = []

        def metric(name, kind, help, samples):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(labels)} {_fmt(value)}")

        with self._lock:
            for h in (self.ttft, self.itl, self.duration):
                lines += h.render()
            metric("ahn_rt_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [({}, self.prompt_tokens)])
            metric("ahn_rt_prompt_tokens_cached_total", "counter",
                   "Prompt tokens taken from the prefix cache instead of prefilled.", [({}, self.cached_tokens)])
            metric("ahn_rt_generation_tokens_total", "counter", "Generated tokens.", [({}, self.generation_tokens)])
            metric("ahn_rt_generations_total", "counter", "Finished generations by finish reason.",
                   [({"finish_reason": k}, v) for k, v in sorted(self.finished_by.items())])
            metric("ahn_rt_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [({"endpoint": e, "status": str(s)}, v) for (e, s), v in sorted(self.requests.items())])
        if scheduler is not None:
            metric("ahn_rt_active_sessions", "gauge", "Generations holding a session.", [({}, scheduler.active)])
            metric("ahn_rt_queue_depth", "gauge", "Generations waiting for a session.", [({}, scheduler.queued)])
            metric("ahn_rt_max_sessions", "gauge", "Sessions the admission control allows at once.",
                   [({}, scheduler.max_active)])
        pc = prefix_cache.stats() if prefix_cache is not None else dict(
            entries=0, bytes=0, max_bytes=0, hits=0, misses=0, stores=0, evictions=0)
        metric("ahn_rt_prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix.", [({}, pc["hits"])])
        metric("ahn_rt_prefix_cache_misses_total", "counter", "Prompts that found no cached prefix.",
               [({}, pc["misses"])])
        metric("ahn_rt_prefix_cache_stores_total", "counter", "States stored in the prefix cache.", [({}, pc["stores"])])
        metric("ahn_rt_prefix_cache_evictions_total", "counter", "States evicted from the prefix cache.",
               [({}, pc["evictions"])])
        metric("ahn_rt_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [({}, pc["bytes"])])
        metric("ahn_rt_prefix_cache_entries", "gauge", "States held by the prefix cache.", [({}, pc["entries"])])
        if sessions is not None:
            metric("ahn_rt_conversations_in_memory", "gauge", "Conversations (session_id) held in memory.",
                   [({}, sessions.in_memory)])
            metric("ahn_rt_conversation_bytes", "gauge", "Bytes held by conversations in memory.",
                   [({}, sessions.nbytes)])
        return "\n".join(lines) + "\n"
