"""Prometheus metrics of one service: jobs by state, queue depth, tokens scored, evaluation seconds,
GPU memory per device, worker states. Each app has its own registry (several apps in one test process)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .store import JobRecord
from .workers import WORKER_STATES

if TYPE_CHECKING:
    from .service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EVAL_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class _Live(Collector):
    """Values read from the service at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        jobs = GaugeMetricFamily("pgttt_jobs", "Jobs in the store by state", labels=["state"])
        for state, count in service.store.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("pgttt_queue_depth", "Jobs waiting for a worker", value=len(service.scheduler.pending))
        states = GaugeMetricFamily(
            "pgttt_worker_state", "1 for each worker's current state", labels=["worker", "device", "state"]
        )
        memory = GaugeMetricFamily(
            "pgttt_gpu_memory_bytes", "GPU memory of each worker's device", labels=["device", "kind"]
        )
        for worker in service.pool.workers:
            for state in WORKER_STATES:
                states.add_metric([str(worker.index), worker.device, state], float(worker.state == state))
            for kind, value in (worker.memory or {}).items():
                memory.add_metric([worker.device, kind], value)
        yield states
        yield memory


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.tokens_scored = Counter(
            "pgttt_tokens_scored", "Tokens scored by finished evaluations", registry=self.registry
        )
        self.cache_hits = Counter(
            "pgttt_cache_hits", "Submissions answered from the result cache", registry=self.registry
        )
        self.eval_seconds = Histogram(
            "pgttt_eval_seconds",
            "Wall time of evaluations that ran, by final state",
            ["state"],
            buckets=EVAL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(service))

    def job_finished(self, job: JobRecord) -> None:
        if job.result is not None:
            self.tokens_scored.inc(int(job.result.get("tokens_scored") or 0))
        if job.started_at and job.finished_at:
            seconds = (_parse(job.finished_at) - _parse(job.started_at)).total_seconds()
            self.eval_seconds.labels(job.state).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
