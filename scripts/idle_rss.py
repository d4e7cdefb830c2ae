#!/usr/bin/env python3
"""User memory (RSS) per idle relayed connection, measured warm, side by side.

For every (binary, engine) pair, each round: a backend that accepts and stays silent (this
script, one thread); the relay started in a session of its own (`setsid`, as a service
manager starts it) in front of it; one connection opened end to end and closed again, so
the engine has served once (first-use allocations are not per-connection costs); the
relay's VmRSS read; N connections opened and held idle for --hold seconds (every one
accepted by the backend, so each is relayed end to end); VmRSS read again. The figure is
(after - before) / N. Rounds alternate the order of the pairs. The table also gives the
anonymous part alone (RssAnon): VmRSS counts the binary's code pages too, which a burst that
runs code the warm-up did not maps in 64 KiB fault-around windows (shared, clean page cache,
not memory the connections hold).

    scripts/idle_rss.py [--conns 2000] [--hold 1.5] [--rounds 3] [--engines uring,tokio]
        [--warm one|per-cpu] [--bin LABEL=PATH ...]
        # default: main=$CARGO_TARGET_DIR/release/ringfwd

--warm per-cpu warms every worker rather than one: one warm-up connection from each CPU the
script may run on (the script pinned there while it connects; the uring engine steers a
connection to the worker of the CPU that took its SYN). With the default (--warm one, the
method of issue 21) only the worker that took the warm-up connection has served, and the
other workers' first connection pays their first-use allocations inside the measurement
(a worker's metrics shard allocates a 136 KiB histogram at its first sample).

RSS moves in pages (and in whole huge pages where the allocator's memory is backed by
them): read the per-connection figure as "what N connections made the process touch",
and run several rounds. Needs RLIMIT_NOFILE above 2 N + 100 (raised to the hard limit here).
"""
import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def vm_rss_kib(pid):
    """(VmRSS, RssAnon) in KiB: all resident memory, and the anonymous (private) part of it,
    i.e. without file-backed pages such as the binary's code."""
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon"):
                got[key] = int(line.split()[1])
    if len(got) != 2:
        raise SystemExit(f"/proc/{pid}/status lacks VmRSS or RssAnon")
    return got["VmRSS"], got["RssAnon"]


def smaps(pid):
    """Rss and AnonHugePages (KiB) of every mapping, keyed by its address range."""
    out, key = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                key = " ".join(head[:1] + head[5:])
                out[key] = {}
            elif head[0] in ("Rss:", "AnonHugePages:"):
                out[key][head[0][:-1]] = int(head[1])
    return out


def smaps_growth(before, after):
    rows = []
    for k, v in after.items():
        b = before.get(k, {})
        d = v.get("Rss", 0) - b.get("Rss", 0)
        if d:
            rows.append((d, k, v.get("AnonHugePages", 0) - b.get("AnonHugePages", 0)))
    return sorted(rows, reverse=True)


class SilentBackend:
    """Accepts and holds every connection; never reads or writes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.held.append(c)

    def count(self):
        with self.lock:
            return len(self.held)

    def drop_all(self):
        with self.lock:
            for c in self.held:
                c.close()
            self.held = []

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()
        self.drop_all()


def wait_for(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_relay(binary, engine, backend_port, scratch):
    port_probe = socket.socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    log = open(os.path.join(scratch, f"relay-{engine}-{port}.log"), "w")
    proc = subprocess.Popen(
        [binary, "run", "--listen", f"127.0.0.1:{port}", "--upstream",
         f"127.0.0.1:{backend_port}", "--engine", engine],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return port, proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{binary} --engine {engine} exited with {proc.returncode}")
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{binary} --engine {engine} never listened on {port}")


def warm_up(port, backend):
    """One connection established end to end, then let go."""
    base = backend.count()
    warm = socket.create_connection(("127.0.0.1", port))
    wait_for(lambda: backend.count() > base, "the warm-up connection at the backend")
    warm.close()


def one_round(binary, engine, n, hold, backend, scratch, show_maps=False, warm="one"):
    port, proc = start_relay(binary, engine, backend.port, scratch)
    try:
        # The probe connection of start_relay reached the backend too; warm with one more
        # that is established end to end (or one from each CPU), then let it go.
        if warm == "per-cpu":
            cpus = os.sched_getaffinity(0)
            try:
                for cpu in sorted(cpus):
                    os.sched_setaffinity(0, {cpu})
                    warm_up(port, backend)
            finally:
                os.sched_setaffinity(0, cpus)
        else:
            warm_up(port, backend)
        time.sleep(0.3)
        backend.drop_all()
        time.sleep(0.3)
        before = vm_rss_kib(proc.pid)
        maps_before = smaps(proc.pid) if show_maps else None
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
        wait_for(lambda: backend.count() >= n, f"{n} connections at the backend")
        time.sleep(hold)
        after = vm_rss_kib(proc.pid)
        if show_maps:
            for d, k, huge in smaps_growth(maps_before, smaps(proc.pid))[:6]:
                print(f"    mapping {k}: Rss {d:+} KiB (AnonHugePages {huge:+} KiB)")
        for s in socks:
            s.close()
        backend.drop_all()
        return (after[0] - before[0]) * 1024 / n, (after[1] - before[1]) * 1024 / n, before, after
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--hold", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="uring,tokio")
    ap.add_argument("--warm", choices=["one", "per-cpu"], default="one",
                    help="one warm-up connection (issue 21's method) or one from each CPU")
    ap.add_argument("--smaps", action="store_true",
                    help="print the mappings whose Rss grew (from /proc/PID/smaps)")
    ap.add_argument("--bin", action="append", default=[],
                    help="LABEL=PATH of a ringfwd binary (repeatable)")
    a = ap.parse_args()
    if not a.bin:
        target = os.environ.get("CARGO_TARGET_DIR", "target")
        a.bin = [f"main={target}/release/ringfwd"]
    bins = [tuple(b.split("=", 1)) for b in a.bin]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * a.conns + 100:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is too low for {a.conns} connections")
    pairs = [(label, path, e) for label, path in bins for e in a.engines.split(",")]
    scratch = tempfile.mkdtemp(prefix="idle-rss-")
    backend = SilentBackend()
    results = {(label, e): [] for label, _, e in pairs}
    try:
        for r in range(a.rounds):
            order = pairs if r % 2 == 0 else list(reversed(pairs))
            for label, path, engine in order:
                per, anon, before, after = one_round(path, engine, a.conns, a.hold, backend,
                                                     scratch, a.smaps, a.warm)
                results[(label, engine)].append((per, anon))
                print(f"round {r + 1} {label:>10} {engine:<6} RSS {before[0]} -> {after[0]} KiB: "
                      f"{per:.0f} B per idle connection ({anon:.0f} B anonymous)", flush=True)
    finally:
        backend.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n| build | engine | B per idle connection, median of {a.rounds} ({a.conns} held "
          f"{a.hold} s, warm-up: {a.warm}) | rounds | anonymous only: median | rounds |")
    print("|---|---|---|---|---|---|")
    for (label, engine), v in results.items():
        rss, anon = [x[0] for x in v], [x[1] for x in v]
        print(f"| {label} | {engine} | {statistics.median(rss):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in rss)} | {statistics.median(anon):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in anon)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
