"""Prometheus metrics of one server, in a registry of its own.

A worker of `lookalike-serve --workers N` runs with PROMETHEUS_MULTIPROC_DIR set: its values go to
files there and the supervisor serves them all, counters and histograms summed over the workers, each
gauge as its mode says (queue depth summed, availability version the lowest, served version per worker).
"""

from __future__ import annotations

import logging
import os
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from server.core import CoreObserver

# gRPC's record of an answer its core refused to send (grpc/grpc#32551 logs it, with a traceback, at ERROR).
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_UNDELIVERED = re.compile(r"ExecuteBatchError raised in core by servicer method \[(.*)\]")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics(CoreObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._served: str | None = None
        self.requests = Counter("lookalike_requests", "RPCs by method and status code", ["method", "code"],
                                registry=r)
        self.latency = Histogram("lookalike_request_latency_seconds", "RPC latency by method", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lookalike_batch_size", "images per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.model_seconds = Histogram("lookalike_model_seconds", "model time per batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth_gauge = Gauge("lookalike_queue_depth", "images waiting for the model", registry=r,
                                       multiprocess_mode="livesum")
        self.dropped_expired = Counter("lookalike_dropped_expired", "queued images dropped because their "
                                       "deadline passed or their caller cancelled", registry=r)
        self.reloads = Counter("lookalike_reloads", "version reload attempts by result", ["result"], registry=r)
        self.model_loads = Counter("lookalike_model_loads", "SavedModels loaded (a version with the served "
                                   "version's model shares it instead)", registry=r)
        if self.multiprocess:  # Info does not work across processes: one gauge per (worker, version)
            self.version = Gauge("lookalike_served_info", "the artifact version being served", ["version"],
                                 registry=r, multiprocess_mode="liveall")
        else:
            self.version = Info("lookalike_served", "the artifact version being served", registry=r)
        self.hidden_products = Gauge("lookalike_hidden_products", "products of the served version hidden from "
                                     "results (out of stock, delisted, blocked)", registry=r,
                                     multiprocess_mode="livemax")
        self.availability_version = Gauge("lookalike_availability_version", "the availability.json version in "
                                          "force (across workers: the lowest)", registry=r,
                                          multiprocess_mode="livemin")
        self.availability_reloads = Counter("lookalike_availability_reloads", "availability.json reads by result "
                                            "(applied, refused)", ["result"], registry=r)
        self.delta_sequence = Gauge("lookalike_delta_sequence", "the last delta of the served version applied (across "
                                    "workers: the lowest)", registry=r, multiprocess_mode="livemin")
        self.delta_rows = Gauge("lookalike_delta_rows", "image rows of the served version's deltas, scanned exactly on "
                                "every query", registry=r, multiprocess_mode="livemax")
        self.delta_reads = Counter("lookalike_delta_reads", "deltas read by result (applied, refused: unreadable, "
                                   "the server keeps what it had)", ["result"], registry=r)
        self.result_cache_lookups = Counter("lookalike_result_cache", "FindSimilar by id answers looked up in the "
                                            "result cache, by result (hit, miss)", ["result"], registry=r)
        # What the cache holds against --result-cache-size / --result-cache-mb (the bytes are the cache's estimate).
        self.result_cache_entries = Gauge("lookalike_result_cache_entries", "answers the result cache holds",
                                          registry=r, multiprocess_mode="livesum")
        self.result_cache_bytes = Gauge("lookalike_result_cache_bytes", "memory the result cache's answers hold, "
                                        "as its byte bound counts it", registry=r, multiprocess_mode="livesum")
        self.retire_collection_seconds = Histogram(
            "lookalike_retire_collection_seconds", "the full garbage collection that frees a retired version (the "
            "event loop waits for it)", buckets=_LATENCY_BUCKETS, registry=r)
        # Refused before the servicer sees them (so not in lookalike_requests): a client learns RESOURCE_EXHAUSTED
        # (HTTP 429), the operator that the process ran out of places.
        self.admission_refusals = Counter("lookalike_admission_refused", "calls refused at once, by protocol (grpc, "
                                          "http) and reason (budget: --max-concurrent-rpcs calls in flight; "
                                          "http_bodies: HTTP's share of it still reading bodies)",
                                          ["protocol", "reason"], registry=r)
        self.undelivered = Counter("lookalike_undelivered_answers", "answers gRPC did not send because their call "
                                   "had ended first (the client cancelled, the deadline passed, the connection "
                                   "closed), by method", ["method"], registry=r)
        self.plans = Counter("lookalike_query_plans", "index queries by the plan chosen (neighbour_list, "
                             "exact, annoy, annoy_then_exact)", ["plan"], registry=r)
        # Children bound once per label values: labels() costs more than the inc() or observe() it leads to, twice
        # per RPC on the path of the cheapest calls.
        self._rpc_children: dict[tuple[str, str], tuple] = {}
        self._plan_children: dict[str, Counter] = {}

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        """One RPC finished with `code` after `seconds`."""
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (self.requests.labels(method, code),
                                                             self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def admission_refused(self, protocol: str, reason: str) -> None:
        self.admission_refusals.labels(protocol, reason).inc()

    def result_cache(self, hit: bool) -> None:
        self.result_cache_lookups.labels("hit" if hit else "miss").inc()

    def result_cache_held(self, entries: int, held_bytes: int) -> None:
        self.result_cache_entries.set(entries)
        self.result_cache_bytes.set(held_bytes)

    def served(self, version: str) -> None:
        if not self.multiprocess:
            self.version.info({"version": version})
            return
        if self._served is not None and self._served != version:
            self.version.labels(self._served).set(0)
        self.version.labels(version).set(1)
        self._served = version

    def batch_done(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def expired(self, count: int) -> None:
        self.dropped_expired.inc(count)

    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def plan_chosen(self, plan: str) -> None:
        child = self._plan_children.get(plan)
        if child is None:
            child = self._plan_children[plan] = self.plans.labels(plan)
        child.inc()


class UndeliveredAnswers(logging.Filter):
    """On gRPC's own logger: its ERROR and traceback for an answer it could not send because the call had ended
    first (a client cancelling, or its deadline passing, while the servicer finished: a race with the client, not
    a fault of the server) become one INFO line and a count in lookalike_undelivered_answers_total{method}. Every
    other record passes unchanged."""

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        match = _UNDELIVERED.fullmatch(record.getMessage())
        if match is None:
            return True
        method = match.group(1).rsplit("/", 1)[-1]
        self.metrics.undelivered.labels(method).inc()
        record.msg, record.args = "%s: the answer was not sent, its call had ended first (cancelled by the client, " \
                                  "past its deadline or disconnected)", (method,)
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = None
        return logging.getLogger(GRPC_CORE_LOGGER).isEnabledFor(logging.INFO)
