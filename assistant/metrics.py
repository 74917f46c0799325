"""Prometheus metrics of the chat server, in the text format ``prometheus-client`` writes.

Only counts, timings and the adapter version: no customer text, no session or turn ids (a label
per turn would also grow without bound). Each server has its own registry, so several apps in one
process (the tests) count separately.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a CPU answer takes from under one to tens of seconds, a GPU one a fraction of that.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServingMetrics:
    """The counters :mod:`app` updates per answer, and gauges read when scraped."""

    def __init__(self, in_flight: Callable[[], int], adapter: Callable[[], str | None],
                 feedback_counts: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.answers = Counter("tuneloop_answers", "Answers finished, by how they ended (complete, interrupted, error).",
                               ["status"], registry=self.registry)
        self.busy_refusals = Counter("tuneloop_busy_refusals", "Questions refused at once because every answer slot and waiting place was taken (or the server was draining).",
                                     registry=self.registry)
        self.first_token = Histogram("tuneloop_first_token_seconds", "Seconds from admitting a question to its first answer token.",
                                     buckets=_BUCKETS, registry=self.registry)
        self.latency = Histogram("tuneloop_answer_seconds", "Seconds from admitting a question to the end of its answer.",
                                 buckets=_BUCKETS, registry=self.registry)
        self.tokens = Counter("tuneloop_tokens", "Tokens of finished answers: prompt (in) and generated (out).",
                              ["direction"], registry=self.registry)
        queue = Gauge("tuneloop_answers_in_flight", "Answers admitted and not finished: generating or waiting for a slot.",
                      registry=self.registry)
        queue.set_function(in_flight)
        self.registry.register(_Snapshot(adapter, feedback_counts))
        for status in ("complete", "interrupted", "error"):
            self.answers.labels(status)  # present at 0 from the start, so rate() sees the first one

    def observe(self, status: str, stats) -> None:
        """One finished answer: its outcome, timings and token counts (an ``AnswerStats``)."""
        self.answers.labels(status).inc()
        self.latency.observe(stats.latency_s)
        if stats.first_token_s is not None:
            self.first_token.observe(stats.first_token_s)
        self.tokens.labels("in").inc(stats.tokens_in or 0)
        self.tokens.labels("out").inc(stats.tokens_out or 0)

    def text(self) -> bytes:
        """The exposition, as a scrape of ``/metrics`` returns it."""
        return generate_latest(self.registry)


class _Snapshot:
    """Values read at scrape time: the adapter serving, and the feedback tables' counts."""

    def __init__(self, adapter: Callable[[], str | None], feedback_counts: Callable[[], dict[str, int]] | None) -> None:
        self._adapter = adapter
        self._feedback_counts = feedback_counts

    def collect(self):
        serving = GaugeMetricFamily("tuneloop_adapter_serving", "1 for the adapter version answering now (base = no adapter).",
                                    labels=["version"])
        serving.add_metric([self._adapter() or "base"], 1)
        yield serving
        if self._feedback_counts is not None:
            rows = GaugeMetricFamily("tuneloop_feedback_rows", "Rows of the feedback log by kind (turns, up, down, corrections, pending_review, flagged_votes).",
                                     labels=["kind"])
            for kind, count in self._feedback_counts().items():
                rows.add_metric([kind], count)
            yield rows
