"""Prometheus metrics of one server, in its own registry (two apps in one process never share series).

    lorakit_waiting_requests            gauge    requests queued in the engine
    lorakit_running_sequences           gauge    sequences being decoded
    lorakit_resident_adapters           gauge    adapters loaded in the engine's memory
    lorakit_tokens_per_second           gauge    the engine's recent generation speed
    lorakit_generated_tokens_total      counter  tokens generated since start
    lorakit_merged_weights              gauge    1 while decode steps run on one adapter's merged weights
    lorakit_merged_seconds_total        counter  engine seconds spent on merged weights
    lorakit_weight_switches_total       counter  switches of the decode steps between merged and unmerged weights
    lorakit_prefix_cache_hit_rate       gauge    share of prompt tokens taken from the prefix cache since start
    lorakit_prefix_cache_hit_tokens_total  counter  prompt tokens taken from the prefix cache
    lorakit_prefix_cache_blocks         gauge    blocks the prefix cache holds
    lorakit_prefix_cache_bytes          gauge    bytes they take
    lorakit_requests_total              counter  generation requests by model and status code
    lorakit_request_latency_seconds     histogram  from request to the last byte, by model
    lorakit_time_to_first_token_seconds histogram  from admission to the first token, by model
    lorakit_variant_requests_total      counter  requests for an alias, by alias and the variant that served it
    lorakit_variant_errors_total        counter  those that ended with an error status (>= 400)
    lorakit_variant_time_to_first_token_seconds  histogram  by alias and variant
    lorakit_variant_tokens_per_second   histogram  each request's decode rate after its first token, by alias
                                                   and variant

The engine's figures are read from `engine.stats()` once per scrape. Requests naming a model that does not
exist (or that the caller may not see) are counted under model "-", so callers cannot grow the label set
without bound; requests for runtime-loaded adapters under "runtime", so /metrics (which needs no key)
names no tenant's adapters. Aliases follow the same rule (serve/aliases.py): a runtime alias is "runtime".
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKENS_PER_SECOND_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
VARIANT = ["alias", "variant"]


class _EngineCollector:
    """Reads the engine's live figures at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, doc, value in (("lorakit_waiting_requests", "Requests queued in the engine", stats.waiting),
                                 ("lorakit_running_sequences", "Sequences being decoded", stats.running),
                                 ("lorakit_resident_adapters", "Adapters in the engine's memory",
                                  stats.resident_adapters),
                                 ("lorakit_tokens_per_second", "Recent generation speed", stats.tokens_per_second)):
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield CounterMetricFamily("lorakit_generated_tokens", "Tokens generated since start",
                                  value=float(stats.generated_tokens_total))
        switching = stats.switching  # no adapter's name: /metrics needs no key
        yield GaugeMetricFamily("lorakit_merged_weights", "1 while decode steps run on one adapter's merged weights",
                                value=float(switching.merged_lane is not None))
        yield CounterMetricFamily("lorakit_merged_seconds", "Engine seconds spent on merged weights",
                                  value=switching.merged_seconds)
        yield CounterMetricFamily("lorakit_weight_switches", "Switches of the decode steps between merged and "
                                  "unmerged weights", value=float(switching.switches))
        prefix = stats.prefix
        yield GaugeMetricFamily("lorakit_prefix_cache_hit_rate", "Share of prompt tokens taken from the prefix cache",
                                value=prefix.hit_rate)
        yield CounterMetricFamily("lorakit_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                                  value=float(prefix.hit_tokens))
        yield GaugeMetricFamily("lorakit_prefix_cache_blocks", "Blocks the prefix cache holds",
                                value=float(prefix.cached_blocks))
        yield GaugeMetricFamily("lorakit_prefix_cache_bytes", "Bytes the prefix cache's blocks take",
                                value=float(prefix.cached_bytes))


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("lorakit_requests", "Generation requests by model and status code",
                                ["model", "status"], registry=self.registry)
        self.latency = Histogram("lorakit_request_latency_seconds", "Request latency, to the last byte", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("lorakit_time_to_first_token_seconds", "Time from admission to the first token",
                                     ["model"], buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.variant_requests = Counter("lorakit_variant_requests", "Requests for an alias by the variant that "
                                        "served them", VARIANT, registry=self.registry)
        self.variant_errors = Counter("lorakit_variant_errors", "Requests for an alias that ended with an error, "
                                      "by variant", VARIANT, registry=self.registry)
        self.variant_first_token = Histogram("lorakit_variant_time_to_first_token_seconds", "Time to the first "
                                             "token, by alias and variant", VARIANT, buckets=FIRST_TOKEN_BUCKETS,
                                             registry=self.registry)
        self.variant_speed = Histogram("lorakit_variant_tokens_per_second", "Each request's decode rate after its "
                                       "first token, by alias and variant", VARIANT,
                                       buckets=TOKENS_PER_SECOND_BUCKETS, registry=self.registry)

    def variant_done(self, alias: str, variant: str, status: int) -> None:
        self.variant_requests.labels(alias, variant).inc()
        if status >= 400:
            self.variant_errors.labels(alias, variant).inc()

    def request_done(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model=model, status=str(status)).inc()
        self.latency.labels(model=model).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
