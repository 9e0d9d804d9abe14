"""The chart's Grafana dashboard (charts/vlmpool/dashboards/vlmpool.json) against what vlmpool exports:
every metric its queries name must exist in the operator's or the proxies' /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[3] / "charts" / "vlmpool" / "dashboards" / "vlmpool.json"
_METRIC = re.compile(r"\b(vlmpool_[a-z0-9_]+)\b")
# Label names are no series: matchers ({...}), groupings (by (...)) and label_values' second argument.
_LABELS = re.compile(r"\{[^}]*\}|\bby \([^)]*\)|,\s*[a-z0-9_]+\)")


def queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    dash = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    return exprs


def queried_metrics(dashboard: dict | None = None) -> set[str]:
    """The series names the dashboard's queries select (vlmpool_* only)."""
    return {m for e in queries(dashboard) for m in _METRIC.findall(_LABELS.sub(" ", e))}


def exported_names(exposition: str) -> set[str]:
    """The series names a /metrics page defines, whether or not a labelled family has samples yet:
    counters as NAME_total, histograms as NAME_bucket/_count/_sum, every sample's own name."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_count", "_sum"))
        names.update(s.name for s in fam.samples)
    return names
