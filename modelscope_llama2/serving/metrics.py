"""The server's Prometheus metrics, in a registry of its own (several apps can live in one process).

Example:
    >>> metrics = ServerMetrics()
    >>> metrics.requests.labels(status="200").inc()
    >>> b'modelscope_llama2_requests_total{status="200"} 1.0' in metrics.render()
    True
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engines.base import Usage

PREFIX = "modelscope_llama2_"


class ServerMetrics:
    """Requests by status, TTFT and per-token latency, token counts, running and waiting choices."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Finished HTTP requests, by status code", ["status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "From arrival (slot wait included) to a choice's first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.inter_token = Histogram(PREFIX + "time_per_output_token_seconds", "Time between a choice's tokens",
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished choices", registry=r)
        self.cached_tokens = Counter(PREFIX + "prompt_tokens_cached",
                                     "Prompt tokens served from a prefix cache", registry=r)
        self.generated_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge(PREFIX + "requests_running", "Choices generating now", registry=r)
        self.waiting = Gauge(PREFIX + "requests_waiting", "Choices waiting for a slot", registry=r)

    def record_usage(self, usage: Usage) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generated_tokens.inc(usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
