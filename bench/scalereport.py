"""bench/scale.py's output: the figures as text, and the growth curves as PNG pictures (matplotlib,
the `bench` extra) drawn from the results file:

    .venv/bin/python bench/scalereport.py docs/perf/scale.jsonl docs/img
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GOALS = {"operator_restart": 10.0, "engine_restart": 60.0}


def report_phase(p: dict) -> None:
    line = f"    {p['phase']:17} {p['seconds']:8.2f}s"
    if "ratio" in p:
        line += f"  (goal {p['goal_s']:g}s: x{p['ratio']:.2f})"
    if "adapters_per_minute" in p:
        line += f"  {p['adapters_per_minute']:.0f} adapters/min"
    if "engines_up_s" in p:
        line += (f"  [engines up {p['engines_up_s']:.1f}s; reload per engine max {p['reload_per_engine_max_s']:.1f}s, "
                 f"after the last one up {p['reload_s']:.1f}s]")
    line += f"  jobs {p['jobs_created']}"
    if "loads" in p:
        line += f"  loads {p['loads']}" + (f"/{p['expected_loads']}" if "expected_loads" in p else "")
    if "failed_requests" in p:
        line += f"  requests {sum(p['requests'].values())} failed {p['failed_requests']}"
    line += f"  apiserver writes {p['apiserver_writes']} reads {p['apiserver_reads']}"
    op, px = p.get("operator") or {}, p.get("proxies") or {}
    line += (f"  operator cpu {op.get('cpu_s', 0):.1f}s peak {op.get('peak_rss_mib', 0):.0f}MiB"
             f"  proxies cpu {px.get('cpu_s_sum', 0):.1f}s (max {px.get('cpu_s_max', 0):.1f}s)"
             f" peak {px.get('peak_rss_mib_max', 0):.0f}MiB")
    print(line, flush=True)
    print(f"      writes by resource: {p['apiserver_writes_by_resource']}", flush=True)


def report(r: dict) -> None:
    n, m = r["adapters"], r["pods"]
    ph = {p["phase"]: p for p in r["phases"]}
    print()
    print(f"vlmpool scale bench: {n} adapters x {m} pods  (git {r['git']}; machine {r['machine']})")
    print(f"engine: simulator, {r['lora_load_ms']:g} ms per adapter load, {r['lora_load_workers'] or 'unbounded'} "
          f"load(s) at once per engine")
    print(f"patch Job bound: {r['job_bound']}")
    rows: list[tuple[str, Any, str, str]] = []

    def done(name: str) -> dict | None:
        p = ph.get(name)
        if p is None:
            rows.append((f"{name}: not run (an earlier phase timed out)", "-", "", ""))
        elif p.get("timed_out"):
            rows.append((f"{name}: TIMED OUT", f"> {p['seconds']:g}", "", "MISSED"))
            return None
        return p

    if p := done("apply_all"):
        rows += [("1 apply all -> Ready everywhere (s)", p["seconds"], "stated", ""),
                 ("  throughput (adapters/min)", p["adapters_per_minute"], "stated", "")]
    if p := done("operator_restart"):
        rows += [("2 operator restart -> converged (s)", p["seconds"], "< 10", f"x{p['ratio']:.2f}"),
                 ("  new Jobs / loads", f"{p['jobs_created']} / {p['loads']}", "0 / 0",
                  "ok" if not (p["jobs_created"] or p["loads"]) else "MISSED")]
    if p := done("engine_restart"):
        rows += [("3 engine up -> all its adapters loaded (s)", p["reload_per_engine_max_s"], "< 60",
                  f"x{p['ratio']:.2f}"),
                 ("  (kill -> last engine up, not vlmpool's)", p["engines_up_s"], "", ""),
                 ("  loads", f"{p['loads']} of {p['expected_loads']}", "NxM", "")]
    if p := done("swap"):
        rows += [("4 version swap under load (s)", p["seconds"], "stated", ""),
                 ("  failed requests", f"{p['failed_requests']} of {sum(p['requests'].values())}", "0",
                  "ok" if p["failed_requests"] == 0 else "MISSED")]
    if p := done("roll"):
        rows += [(f"4b full-capacity roll, maxUnavailable {p['max_unavailable']} (s)", p["seconds"], "stated",
                  f"{p['seconds_per_pod']:.1f}s/pod"),
                 ("  failed requests", f"{p['failed_requests']} of {sum(p['requests'].values())}", "0",
                  "ok" if p["failed_requests"] == 0 else "MISSED")]
    for p in r["phases"]:
        if not p.get("timed_out"):
            w = p["apiserver_writes"]
            rows.append((f"5 apiserver writes, {p['phase']}", w, "O(N+M)",
                         f"{w / (n + m):.2f}/(N+M), {w / (n * m):.2f}/(NxM)"))
    peak = [(p.get("operator") or {}).get("peak_rss_mib", 0) for p in r["phases"] if not p.get("timed_out")]
    rows.append(("  operator peak RSS (MiB)", max(peak, default="-"), "stated", ""))
    rows.append(("  proxy RSS with all adapters (MiB, max)", r["proxy_rss_mib_with_all_adapters"], "stated", ""))
    print(f"{'figure':44} {'value':>14} {'goal':>8}  ratio")
    for name, value, goal, ratio in rows:
        print(f"{name:44} {value!s:>14} {goal:>8}  {ratio}")


def load_results(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _series(results: list[dict]) -> dict[str, list[dict]]:
    """Results grouped by label (the code measured, e.g. main or asyncpush), sorted by N x M; a size
    measured more than once keeps its latest run."""
    groups: dict[str, dict[tuple[int, int], dict]] = {}
    for r in results:
        groups.setdefault(r.get("label") or r.get("git", "?"), {})[(r["adapters"], r["pods"])] = r
    return {k: sorted(v.values(), key=lambda r: r["adapters"] * r["pods"]) for k, v in groups.items()}


def _phase(r: dict, name: str) -> dict | None:
    p = next((p for p in r["phases"] if p["phase"] == name), None)
    return p if p is not None and not p.get("timed_out") else None


def plot(results_path: Path, outdir: Path) -> list[Path]:
    """Two pictures: convergence times and apiserver writes against adapters x pods, goals drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(load_results(results_path))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    markers = "osD^v"

    fig, ax = plt.subplots(figsize=(8, 5))
    figures = [("apply_all", "seconds", "apply all -> Ready"), ("operator_restart", "seconds", "operator restart"),
               ("engine_restart", "reload_per_engine_max_s", "engine restart: reload"),
               ("swap", "seconds", "version swap under load")]
    for si, (label, rs) in enumerate(series.items()):
        for fi, (name, key, title) in enumerate(figures):
            pts = [(r["adapters"] * r["pods"], p[key]) for r in rs if (p := _phase(r, name))]
            timed_out = [r["adapters"] * r["pods"] for r in rs
                         if any(p["phase"] == name and p.get("timed_out") for p in r["phases"])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers[si % len(markers)], color=f"C{fi}",
                        linestyle="-" if si == 0 else "--", label=f"{title} [{label}]")
            if timed_out:
                ax.scatter(timed_out, [max(1.0, ax.get_ylim()[1])] * len(timed_out), marker="x", color=f"C{fi}",
                           label=f"{title} [{label}]: timed out")
    ax.axhline(GOALS["operator_restart"], color="C1", linestyle=":", label="goal: operator restart < 10 s (500x20)")
    ax.axhline(GOALS["engine_restart"], color="C2", linestyle=":", label="goal: engine-restart reload < 60 s (500x20)")
    ax.axvline(500 * 20, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters x pods (log)")
    ax.set_ylabel("seconds (log)")
    ax.set_title("vlmpool convergence time against adapters x pods")
    _annotate_sizes(ax, series)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    paths.append(outdir / "scale-time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    all_sizes = sorted({(r["adapters"], r["pods"]) for rs in series.values() for r in rs}, key=lambda s: s[0] * s[1])
    xs = [n * m for n, m in all_sizes]
    ax.plot(xs, [n + m for n, m in all_sizes], color="black", linestyle=":",
            label="goal shape: N + M (one per adapter and pod)")
    ax.plot(xs, [n * m for n, m in all_sizes], color="grey", linestyle=":", label="N x M (one per adapter per pod)")
    for si, (label, rs) in enumerate(series.items()):
        for fi, (name, _key, title) in enumerate(figures):
            pts = [(r["adapters"] * r["pods"], p["apiserver_writes"]) for r in rs if (p := _phase(r, name))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers[si % len(markers)], color=f"C{fi}",
                        linestyle="-" if si == 0 else "--", label=f"{title} [{label}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters x pods (log)")
    ax.set_ylabel("apiserver writes in the phase (log)")
    ax.set_title("apiserver writes (POST/PUT/PATCH/DELETE, all clients) per phase")
    _annotate_sizes(ax, series)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    paths.append(outdir / "scale-writes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _annotate_sizes(ax: Any, series: dict[str, list[dict]]) -> None:
    sizes = sorted({(r["adapters"], r["pods"]) for rs in series.values() for r in rs})
    for n, m in sizes:
        ax.annotate(f"{n}x{m}", (n * m, ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4),
                    fontsize=7, ha="center", color="grey")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: scalereport.py RESULTS.jsonl OUTDIR")
    for path in plot(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
