#!/usr/bin/env python3
"""Turn one application load generator's output into the JSON run record of scripts/bench.sh.

    bench_parse.py wrk OUTPUT JSON LABEL SECONDS
    bench_parse.py redis OUTPUT JSON LABEL SECONDS REQUESTS_PER_TEST

`wrk --latency` output gives requests/s and the latency distribution; `redis-benchmark --csv`
gives one line per test (SET, GET): requests/s is their combined rate (all requests over
the time both took), the latency percentiles are GET's. SECONDS is the wall time of the
whole command as bench.sh measured it (the CPU readings span the same window). Exits 1,
writing nothing, when the output holds no figure: bench.sh then reports the run as failed.
Standard library only.
"""
import csv
import json
import re
import sys


def wrk_time_us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return None
    scale = {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]
    return float(m.group(1)) * scale


def parse_wrk(text):
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.M)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if not rps or not total or float(rps.group(1)) == 0:
        return None
    d = {"req_per_s": float(rps.group(1)), "requests": int(total.group(1)),
         "duration_s": wrk_time_us(total.group(2) + total.group(3)) / 1e6}
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}(?:\.000)?%\s+(\S+)", text, re.M)
        if m:
            d[f"p{p}_us"] = wrk_time_us(m.group(1))
    # A connect/read error on Connection: close is a normal close racing a write; count them
    # but judge the run by its completed requests.
    d["errors"] = (sum(int(x) for x in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return d


def parse_redis(text):
    rows = {}
    for row in csv.reader(line for line in text.splitlines() if line.startswith('"')):
        if row and row[0] != "test":
            rows[row[0]] = row
    if not rows:
        return None
    rates = [float(r[1]) for r in rows.values()]
    if any(r == 0 for r in rates):
        return None
    get = rows.get("GET") or next(iter(rows.values()))
    d = {"req_per_s_by_test": {k: float(r[1]) for k, r in rows.items()},
         # Every test sends the same number of requests: the combined rate is their harmonic mean.
         "req_per_s": len(rates) / sum(1 / r for r in rates)}
    if len(get) >= 7:
        d["p50_us"] = float(get[4]) * 1000
        d["p99_us"] = float(get[6]) * 1000
    d["errors"] = 0
    return d


def main():
    kind, output, out_json, label, seconds = sys.argv[1:6]
    text = open(output, errors="replace").read()
    d = parse_wrk(text) if kind == "wrk" else parse_redis(text)
    if d is None:
        print(f"bench_parse: no figure in {output}", file=sys.stderr)
        return 1
    d.setdefault("duration_s", float(seconds))
    if "requests" not in d:
        d["requests"] = int(sys.argv[6]) * len(d["req_per_s_by_test"])
    d["label"] = label
    d["mode"] = kind
    with open(out_json, "w") as f:
        json.dump(d, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
