#!/usr/bin/env python3
"""Summarise a scripts/bench.sh results folder: medians over rounds, ratios against the direct
connection and the tokio engine, relay CPU per GB (or per request), idle memory per
connection; writes report.md, summary.csv and SVG plots. Standard library only.

    python3 scripts/bench_report.py results/20261122-120000
"""
import csv
import glob
import json
import math
import os
import statistics
import sys

# What each workload is judged by: (JSON field, unit, higher is better).
PRIMARY = {
    "bulk1": ("gbit_per_s", "Gbit/s", True),
    "bulk1_down": ("gbit_per_s", "Gbit/s", True),
    "bulk8": ("gbit_per_s", "Gbit/s", True),
    "rr64": ("req_per_s", "req/s", True),
    "rr1": ("p50_us", "p50 µs", False),
    "rr64_open": ("p99_us", "p99 µs", False),
    "rr16k": ("req_per_s", "req/s", True),
    "connect": ("conn_per_s", "conn/s", True),
    "redis_pipe": ("req_per_s", "req/s", True),
    "redis1": ("req_per_s", "req/s", True),
    "http_ka": ("req_per_s", "req/s", True),
    "http_close": ("req_per_s", "req/s", True),
    "tls": ("req_per_s", "handshakes/s", True),
}
DESCRIPTION = {
    "bulk1": "one upload stream (128 KiB writes) to a sink",
    "bulk1_down": "one download stream from a source",
    "bulk8": "8 upload streams to a sink",
    "rr64": "64-byte request/response, 8 connections, closed loop",
    "rr1": "64-byte ping-pong on one connection: the round trip a relay adds",
    "rr64_open": "64-byte request/response, 8 connections, open loop at 10 000 req/s",
    "rr16k": "16 KiB request/response, 8 connections, closed loop",
    "connect": "connection churn: connect, one 64-byte exchange, close (4 workers)",
    "redis_pipe": "redis-benchmark SET+GET, 50 connections, 16 commands pipelined (p50/p99: GET)",
    "redis1": "redis-benchmark SET+GET, one connection, unpipelined (p50/p99: GET)",
    "http_ka": "wrk against nginx HTTP (1 KiB body), 16 keep-alive connections",
    "http_close": "wrk against nginx HTTP (1 KiB body), `Connection: close`, 8 connections",
    "tls": "new TLS 1.3 handshakes (no resumption) through an SNI-routed rule to nginx HTTPS, 4 clients",
}
ORDER = ["direct", "uring-copy", "uring-splice", "uring-auto", "uring-auto-before", "uring-auto-nometrics", "tokio",
         "tokio-nometrics", "std",
         "uring-unpinned", "uring-busypoll", "haproxy-nosplice", "haproxy-splice", "haproxy-splice-auto", "nginx", "socat"]


def load(folder):
    runs = {}
    for path in glob.glob(os.path.join(folder, "runs", "*.json")):
        workload, variant, _round, _ = os.path.basename(path).split(".")
        with open(path) as f:
            runs.setdefault((workload, variant), []).append(json.load(f))
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        mag = int(math.floor(math.log10(abs(v))))
        return f"{v:.{max(0, digits - 1 - mag)}f}"
    return str(v)


def variant_key(v):
    return (ORDER.index(v) if v in ORDER else len(ORDER), v)


def summarise(runs):
    rows = []
    workloads = sorted({w for w, _ in runs if w != "idle"}, key=lambda w: list(PRIMARY).index(w) if w in PRIMARY else 99)
    for w in workloads:
        field, unit, higher = PRIMARY.get(w, ("gbit_per_s", "", True))
        variants = sorted({v for ww, v in runs if ww == w}, key=variant_key)
        base = {v: med([r.get(field) for r in runs[(w, v)]]) for v in variants}
        for v in variants:
            rs = runs[(w, v)]
            value = base[v]
            row = {
                "workload": w, "variant": v, "metric": field, "unit": unit, "rounds": len(rs),
                "value": value,
                "x_direct": (value / base["direct"]) if value and base.get("direct") else None,
                "x_tokio": (value / base["tokio"]) if value and base.get("tokio") else None,
                "p50_us": med([r.get("p50_us") for r in rs]),
                "p99_us": med([r.get("p99_us") for r in rs]),
                "p999_us": med([r.get("p999_us") for r in rs]),
                "errors": sum(r.get("errors", 0) for r in rs),
            }
            if not higher and row["x_direct"]:
                # Lower is better: keep "×" meaning "as good as" (direct/value).
                row["x_direct"] = base["direct"] / value
                row["x_tokio"] = (base["tokio"] / value) if base.get("tokio") else None
            # CPU was read around warm-up + measured window; keep the measured share.
            cpu = [r["relay_cpu_s"] * r["duration_s"] / (r["duration_s"] + r.get("warmup_s", 1.0))
                   if r.get("relay_cpu_s") is not None and r.get("duration_s") else None for r in rs]
            mcpu = [r["machine_cpu_s"] * r["duration_s"] / (r["duration_s"] + r.get("warmup_s", 1.0))
                    if r.get("machine_cpu_s") is not None and r.get("duration_s") else None for r in rs]
            if field == "gbit_per_s":
                per_unit = [r["bytes"] / 1e9 if r.get("bytes") else None for r in rs]
                row["cpu_unit"] = "CPU-s/GB"
                scale = 1.0
            else:
                count = "connects" if field == "conn_per_s" else "requests"
                per_unit = [r.get(count) or None for r in rs]
                row["cpu_unit"] = "CPU-µs/op"
                scale = 1e6
            row["cpu_per"] = None if v == "direct" else med(
                [c / u * scale for c, u in zip(cpu, per_unit) if c is not None and u])
            # Every CPU's busy time (all processes): what the whole path costs the machine.
            row["machine_cpu_per"] = med([c / u * scale for c, u in zip(mcpu, per_unit) if c is not None and u])
            rows.append(row)
    idle = []
    for (w, v), rs in sorted(runs.items(), key=lambda kv: variant_key(kv[0][1])):
        if w == "idle":
            r = rs[0]
            idle.append({"variant": v, "established": r.get("established"),
                         "rss_per_conn_bytes": r.get("rss_per_conn_bytes"),
                         "pss_per_conn_bytes": r.get("pss_per_conn_bytes")})
    return rows, idle


def svg_bars(path, title, unit, items):
    """Horizontal bars: items = [(label, value)]."""
    items = [(l, v) for l, v in items if v is not None]
    if not items:
        return
    w, bar, gap, left = 720, 22, 8, 150
    h = 50 + len(items) * (bar + gap)
    top = max(v for _, v in items) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>']
    for i, (label, v) in enumerate(items):
        y = 35 + i * (bar + gap)
        bw = (w - left - 90) * v / top
        color = "#2b7bba" if label.startswith("uring") else ("#999" if label == "direct" else "#e0893a")
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bar}" fill="{color}"/>')
        out.append(f'<text x="{left + bw + 4:.1f}" y="{y + 15}">{fmt(v)} {unit}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def svg_percentiles(path, title, series):
    """Latency percentile curves on a log axis: series = [(label, {pct: us})]."""
    series = [(l, p) for l, p in series if all(p.get(k) for k in ("p50_us", "p99_us"))]
    if not series:
        return
    keys = [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]
    w, h, left, bottom, top = 720, 360, 70, 40, 40
    vals = [p[k] for _, p in series for k, _ in keys if p.get(k)]
    lo, hi = math.log10(max(1, min(vals)) * 0.8), math.log10(max(vals) * 1.25)
    def y(v):
        return h - bottom - (math.log10(v) - lo) / (hi - lo) * (h - bottom - top)
    def x(i):
        return left + i * (w - left - 160) / (len(keys) - 1)
    colors = ["#999", "#2b7bba", "#1b9e77", "#7570b3", "#e0893a", "#d95f02", "#e7298a", "#66a61e", "#a6761d", "#666"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>']
    for i, (_, name) in enumerate(keys):
        out.append(f'<text x="{x(i):.1f}" y="{h - 15}" text-anchor="middle">{name}</text>')
    for e in range(int(math.floor(lo)), int(math.ceil(hi)) + 1):
        v = 10 ** e
        if lo <= e <= hi:
            out.append(f'<line x1="{left}" x2="{w - 160}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{fmt(float(v))} µs</text>')
    for n, (label, p) in enumerate(series):
        c = colors[n % len(colors)]
        pts = [(x(i), y(p[k])) for i, (k, _) in enumerate(keys) if p.get(k)]
        out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)))
        out.append(f'<text x="{w - 150}" y="{50 + n * 16}" fill="{c}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def missing_figures(folder, rows):
    """(workload, variant) pairs that machine.txt announced and that have no figure."""
    text = open(os.path.join(folder, "machine.txt")).read()
    get = lambda key: next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith(key + ":")), [])
    have = {(r["workload"], r["variant"]) for r in rows
            if r["value"] and r.get("machine_cpu_per") is not None
            and (r["variant"] == "direct" or r.get("cpu_per") is not None)}
    return [(w, v) for w in get("workloads") for v in get("variants") if (w, v) not in have]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    folder = args[0]
    rows, idle = summarise(load(folder))
    with open(os.path.join(folder, "summary.csv"), "w", newline="") as f:
        fields = ["workload", "variant", "metric", "unit", "rounds", "value", "x_direct", "x_tokio",
                  "p50_us", "p99_us", "p999_us", "cpu_per", "machine_cpu_per", "cpu_unit", "errors"]
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    lines = ["# ringfwd side-by-side benchmark", ""]
    machine = os.path.join(folder, "machine.txt")
    placement = None
    if os.path.exists(machine):
        text = open(machine).read()
        lines += ["```", text.rstrip(), "```", ""]
        placement = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("placement:")), None)
    for w in dict.fromkeys(r["workload"] for r in rows):
        rs = [r for r in rows if r["workload"] == w]
        unit = rs[0]["unit"]
        cpu_unit = next((r.get("cpu_unit") for r in rs if r.get("cpu_unit")), "CPU")
        lines += [f"## {w}: {DESCRIPTION.get(w, '')}", ""]
        if placement:
            lines += [f"Placement: {placement}.", ""]
        lines += [f"| variant | {unit} (median) | × direct | × tokio | p50 µs | p99 µs | p99.9 µs | relay {cpu_unit} | machine {cpu_unit} | rounds | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(f"| {r['variant']} | {fmt(r['value'])} | {fmt(r['x_direct'])} | {fmt(r['x_tokio'])} | "
                         f"{fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['p999_us'])} | {fmt(r.get('cpu_per'))} | "
                         f"{fmt(r.get('machine_cpu_per'))} | {r['rounds']} | {r['errors']} |")
        lines.append("")
        if rs[0]["metric"] == "gbit_per_s":
            svg_bars(os.path.join(folder, f"{w}.svg"), f"{w}: {DESCRIPTION.get(w, '')}", "Gbit/s",
                     [(r["variant"], r["value"]) for r in rs])
        else:
            svg_bars(os.path.join(folder, f"{w}.svg"), f"{w}: {DESCRIPTION.get(w, '')}", unit,
                     [(r["variant"], r["value"]) for r in rs])
            svg_percentiles(os.path.join(folder, f"{w}-latency.svg"), f"{w}: round-trip percentiles",
                            [(r["variant"], r) for r in rs])
    if idle:
        lines += ["## idle: memory per idle connection (RSS delta ÷ connections)", "",
                  "| variant | established | RSS bytes/conn | PSS bytes/conn |", "|---|---|---|---|"]
        for r in idle:
            lines.append(f"| {r['variant']} | {r['established']} | {fmt(r['rss_per_conn_bytes'])} | {fmt(r['pss_per_conn_bytes'])} |")
        lines.append("")
    report = "\n".join(lines)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    if "--require-all" in sys.argv:
        missing = missing_figures(folder, rows)
        if missing:
            print("bench_report: no figure (or no CPU reading) for " +
                  ", ".join(f"{w} through {v}" for w, v in missing), file=sys.stderr)
            return 1
        print("bench_report: every workload has a figure through every variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
