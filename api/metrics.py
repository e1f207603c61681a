"""Server metrics in the Prometheus text exposition format (version 0.0.4), served on `GET /metrics`.

`Metrics` (one per server, on ServerState) holds counters and histograms, updated from the event loop
and the engine threads under one lock; gauges (queue length, active sequences, prefix-cache size) are
read from the workers when the page is rendered. `MetricsMiddleware` counts every response by status.

    kawai_requests_total{status="200"}                     responses by HTTP status
    kawai_queue_length{model}                              requests waiting for a sequence slot
    kawai_active_sequences{model}                          sequences being prefilled or decoded
    kawai_prompt_tokens_total{model}                       prompt tokens run through the model
    kawai_prefix_cache_hit_tokens_total{model}             prompt tokens reused from the prefix cache
    kawai_generated_tokens_total{model}                    tokens sampled
    kawai_time_to_first_token_seconds{model}               histogram: request queued -> first token
    kawai_time_per_output_token_seconds{model}             histogram: gap between a stream's tokens
    kawai_prefix_cache_leased / _idle_tokens / _blocks / _shared_tokens{model}  the prefix cache
    kawai_kv_memory_bytes / _budget_bytes{model}           KV memory accounted, and its bound
    kawai_kv_memory_hit_tokens_total / kawai_kv_disk_hit_tokens_total / kawai_kv_created_tokens_total{model}
    kawai_kv_disk_bytes, _read_bytes_total, _load_seconds_total, _written_bytes_total,
        _rejected_files_total, _dropped_writes_total, _evicted_files_total{model}   the disk tier
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf only)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, Histogram]] = {}
        self._help: dict[str, str] = {}
        self._gauge_sources: list[tuple[Callable[[], Iterable[tuple[str, Labels, float, str]]], str]] = []

    def inc(self, name: str, help_text: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help.setdefault(name, help_text)
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, help_text: str, value: float, buckets: Iterable[float], **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help.setdefault(name, help_text)
            series = self._histograms.setdefault(name, {})
            hist = series.get(key)
            if hist is None:
                hist = series[key] = Histogram(buckets)
            hist.observe(value)

    def counter_value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def add_gauges(self, source: Callable[[], Iterable[tuple[str, Labels, float, str]]], kind: str = "gauge") -> None:
        """source() yields (name, labels, value, help) when the page is rendered; `kind` "counter" for
        running totals kept elsewhere (the prefix cache's)."""
        self._gauge_sources.append((source, kind))

    def render(self) -> str:
        lines: list[str] = []
        gauges: dict[str, list[tuple[Labels, float]]] = {}
        gauge_help: dict[str, tuple[str, str]] = {}
        for source, kind in self._gauge_sources:
            for name, labels, value, help_text in source():
                gauges.setdefault(name, []).append((labels, value))
                gauge_help.setdefault(name, (help_text, kind))
        for name in sorted(gauges):
            help_text, kind = gauge_help[name]
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in gauges[name]]
        with self._lock:
            for name in sorted(self._counters):
                lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} counter"]
                lines += [f"{name}{_labels(k)} {_num(v)}" for k, v in sorted(self._counters[name].items())]
            for name in sorted(self._histograms):
                lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} histogram"]
                for key, hist in sorted(self._histograms[name].items()):
                    running = 0
                    for bound, count in zip(hist.bounds, hist.counts):
                        running += count
                        lines.append(f"{name}_bucket{_labels(key + (('le', _num(bound)),))} {running}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.n}")
                    lines.append(f"{name}_sum{_labels(key)} {_num(hist.total)}")
                    lines.append(f"{name}_count{_labels(key)} {hist.n}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every HTTP response by status code (the status sent, or 500 if none was)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.inc("kawai_requests_total", "HTTP responses by status code.", status=str(status["code"]))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
