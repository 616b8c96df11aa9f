"""Prometheus metrics of the server, under vLLM's names with a `dscompile:` prefix.

Counts and gauges are read from the scheduler's `stats()` when /metrics is scraped (one snapshot,
so running + waiting and the token totals agree); latencies are histograms observed as each
request finishes: time to first token, time in the queue and end to end as the scheduler measured
them, and the gaps between a request's tokens as they left the engine thread.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "dscompile:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)

# stats() key -> (metric name, kind, help)
FROM_STATS = {
    "running": ("num_requests_running", "gauge", "Requests in the running batch."),
    "waiting": ("num_requests_waiting", "gauge", "Requests waiting to be admitted."),
    "prompt_tokens_total": ("prompt_tokens", "counter", "Prompt tokens taken in."),
    "generation_tokens_total": ("generation_tokens", "counter", "Tokens generated."),
    "prefix_cache_queries_total": ("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits_total": ("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    "cache_bytes_in_use": ("cache_bytes_in_use", "gauge", "Latent cache bytes held (running rows + prefix cache)."),
    "prefix_cache_bytes": ("prefix_cache_bytes", "gauge", "Latent cache bytes the prefix cache keeps."),
    "aborted_total": ("num_aborted_requests", "counter", "Requests cancelled before they finished (clients gone)."),
    "steps_total": ("engine_steps", "counter", "Engine steps run."),
}


class _StatsCollector:
    def __init__(self, stats: Callable[[], dict], model: str):
        self._stats, self._model = stats, model
        self.stop_cancels = 0  # requests the HTTP layer cancelled at a stop string: finished, not aborted

    def collect(self):
        stats = dict(self._stats())
        if "aborted_total" in stats:
            stats["aborted_total"] -= self.stop_cancels
        for key, (name, kind, doc) in FROM_STATS.items():
            if key not in stats:
                continue
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model], float(stats[key]))
            yield family


class Metrics:
    """The server's registry: the scheduler's stats and the latency histograms."""

    def __init__(self, stats: Callable[[], dict], model: str):
        disable_created_metrics()  # the `_created` series vLLM does not expose either
        self.model = model
        self.registry = CollectorRegistry()
        self._collector = _StatsCollector(stats, model)
        self.registry.register(self._collector)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=LATENCY_BUCKETS,
                             registry=self.registry).labels(model)

        self.ttft = histogram("time_to_first_token_seconds", "Submit to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Gap between two tokens of a request.")
        self.e2e = histogram("e2e_request_latency_seconds", "Submit to finished.")
        self.queue = histogram("request_queue_time_seconds", "Submit to first scheduled.")
        self.success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.failures = Counter(PREFIX + "request_failed", "Requests that failed in the engine.", ["model_name"],
                                registry=self.registry).labels(model)

    def finished(self, done, gaps: list[float], reason: str) -> None:
        """Observe a request the scheduler finished (a `Finished` event), its token gaps and the finish
        reason the client was given (a stop string ends a request the scheduler saw cancelled)."""
        if done.completion_tokens:
            self.ttft.observe(done.ttft_seconds)
        self.e2e.observe(done.e2e_seconds)
        self.queue.observe(done.queue_seconds)
        for gap in gaps:
            self.itl.observe(gap)
        self.success.labels(self.model, reason).inc()
        if done.reason == "cancelled" and reason == "stop":
            self._collector.stop_cancels += 1

    def failed(self) -> None:
        self.failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
