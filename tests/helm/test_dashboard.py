"""The chart's opt-in Grafana dashboard: a ConfigMap in the sidecar-discovery form, carrying
dashboards/vlmpool.json, whose queries name only series the operator and the proxies export.
(tests/e2e checks the same against the /metrics of running pods.)"""

from __future__ import annotations

import json

from helmtest import CHART, by_kind, one
from prometheus_client import generate_latest

from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.proxy.metrics import ProxyMetrics
from vlmpool.testing.dashboard import exported_names, queried_metrics


def _dashboards(docs):
    return [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_off_by_default(helm):
    assert _dashboards(helm.template()) == []


def test_configmap_in_the_sidecar_form(helm):
    docs = helm.template("--set", "grafanaDashboard.enabled=true")
    cm = _dashboards(docs)
    assert len(cm) == 1
    cm = cm[0]
    assert cm["metadata"]["namespace"] == "vlmpool-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["vlmpool.json"]
    dash = json.loads(cm["data"]["vlmpool.json"])
    assert dash == json.loads((CHART / "dashboards" / "vlmpool.json").read_text())
    assert dash["uid"] == "vlmpool-pools"


def test_namespace_labels_and_annotations_for_the_sidecar(helm):
    docs = helm.template("--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.namespace=monitoring",
                         "--set", "grafanaDashboard.labels.grafana_dashboard=yes",
                         "--set", "grafanaDashboard.annotations.grafana_folder=vlmpool")
    cm = _dashboards(docs)[0]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "yes"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "vlmpool"}


def test_bad_values_are_refused(helm):
    res = helm.run("template", "x", str(CHART), "--set", "grafanaDashboard.enable=true", check=False)
    assert res.returncode != 0 and "grafanaDashboard" in res.stderr


def test_pod_monitor_gives_the_pool_label_the_dashboard_selects_on(helm):
    pm = one(helm.template("--set", "poolPodMonitor.enabled=true"), "PodMonitor")
    assert pm["spec"]["podTargetLabels"] == ["vlmpool.io/pool"]
    dash = json.loads((CHART / "dashboards" / "vlmpool.json").read_text())
    assert any("vlmpool_io_pool" in t["expr"] for p in dash["panels"] for t in p.get("targets", []))


def test_every_queried_series_is_exported():
    exported = exported_names(generate_latest(ProxyMetrics().registry).decode()) | exported_names(
        generate_latest(OperatorMetrics().registry).decode())
    queried = queried_metrics()
    # The dashboard covers what the issue asks for.
    assert {"vlmpool_proxy_requests_total", "vlmpool_proxy_request_duration_seconds_bucket",
            "vlmpool_proxy_queue_depth", "vlmpool_proxy_rejected_total", "vlmpool_proxy_adapter_loads_total",
            "vlmpool_proxy_adapter_load_failures_total"} <= queried
    assert queried - exported == set()
