"""Prometheus metrics of the operator, in their own registry (one per operator instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("vlmpool_operator_reconciles_total", "Reconciliations by kind and result.",
                                  ["kind", "result"], registry=r)
        self.errors = Counter("vlmpool_operator_errors_total", "Reconcile errors by kind and reason.",
                              ["kind", "reason"], registry=r)
        self.pushes = Counter("vlmpool_operator_pushes_total", "State pushes to pods by result.",
                              ["result"], registry=r)
        self.push_seconds = Histogram(
            "vlmpool_operator_push_duration_seconds", "Time to push a pool's state to all its running pods.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.pod_push_seconds = Histogram(
            "vlmpool_operator_pod_push_duration_seconds", "Latency of one PUT /admin/v1/state.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.jobs_created = Counter("vlmpool_operator_jobs_created_total", "Jobs created by kind (patch, cleanup).",
                                    ["kind"], registry=r)
        self.job_seconds = Histogram(
            "vlmpool_operator_patch_job_duration_seconds", "Patch Job duration (start to completion) by result.",
            ["result"], buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.patch_queue = Gauge("vlmpool_operator_patch_jobs_queued",
                                 "Adapters waiting for a patch Job slot (--max-patch-jobs).", registry=r)
        self.ready = Gauge("vlmpool_operator_ready", "1 once the operator is watching.", registry=r)
        self.leader = Gauge("vlmpool_operator_leader",
                            "1 while this replica leads (holds the leader-election Lease, or runs without "
                            "leader election), 0 while it is a follower.", registry=r)
