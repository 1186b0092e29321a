"""Prometheus metrics of one server (its own registry: several servers in one process stay apart).

What belongs to one model group carries its `group` label (0, 1, … of --replicas): running, ready,
generate seconds, restarts. The queue and the answers are the server's: one queue for every group."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from a warm 1024² image on 4 GPUs (~1.5 s) to long high-resolution renders.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("shardiff_queue_depth", "Requests waiting in the queue", registry=r)
        self.running = Gauge("shardiff_running", "Requests running on the model group (0 or 1)", ["group"],
                             registry=r)
        self.ready = Gauge("shardiff_ready", "1 when the model group is warm and serving", ["group"], registry=r)
        self.requests = Counter("shardiff_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram("shardiff_request_seconds", "Admission to answer, successful requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("shardiff_queue_seconds", "Admission to dispatch", buckets=QUEUE_BUCKETS,
                                    registry=r)
        self.generate_time = Histogram("shardiff_generate_seconds", "generate_batch on the first rank", ["group"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.lora_switches = Counter("shardiff_lora_switches", "Switches of the fused LoRA adapters", ["group"],
                                     registry=r)
        self.failures = Counter("shardiff_failures", "Failed requests and groups by cause", ["cause"], registry=r)
        self.restarts = Counter("shardiff_restarts", "Restarts of the model group", ["group"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
