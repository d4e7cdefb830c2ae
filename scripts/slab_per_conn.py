#!/usr/bin/env python3
"""Kernel slab memory per relayed idle connection, side by side.

Opens N connections through each relay to a `ringfwd echo` backend (one byte each way, so
every connection is established end to end, then idle for --hold seconds), and reads /proc/slabinfo (active
objects x object size, per cache) and /proc/meminfo `Slab` before and while they are held.
`direct` (client straight to the echo backend) is the cost of the two ends without a relay;
each relay's figure minus direct's is what the relay adds. Rounds alternate the relays.

The counters are system-wide: run it on a quiet machine (a compile churns dentry, inode and
kmalloc caches) and read the per-cache lines, which name what each relay holds, rather than
the total alone. Needs root (slabinfo), `haproxy` for its row.

    sudo scripts/slab_per_conn.py [--conns 3000] [--rounds 2] [--bin target/release/ringfwd]
        [--relays direct,haproxy,uring-copy,uring-auto,tokio] [--hold 3]
"""
import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import time


def slab():
    out = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            p = line.split()
            out[p[0]] = int(p[1]) * int(p[3])
    return out


def slab_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no Slab: in /proc/meminfo")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listen(port, proc):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"relay exited with {proc.returncode} before listening on {port}")
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_relay(kind, binary, echo_port, conns, scratch):
    if kind == "direct":
        return echo_port, None
    port = free_port()
    if kind == "haproxy":
        cfg = os.path.join(scratch, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                f"global\n    maxconn {conns + 100}\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n"
                "    timeout client 1h\n    timeout server 1h\n"
                "    option splice-request\n    option splice-response\n"
                f"listen l\n    bind 127.0.0.1:{port}\n    server s 127.0.0.1:{echo_port}\n"
            )
        proc = subprocess.Popen(["haproxy", "-f", cfg, "-db"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        engine, _, mode = kind.partition("-")
        args = [binary, "run", "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{echo_port}", "--engine", engine]
        if mode:
            args += ["--mode", mode]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "RUST_LOG": "warn"})
    wait_listen(port, proc)
    return port, proc


def measure(port, n, hold):
    time.sleep(0.5)
    before, before_total = slab(), slab_total()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"x")
        socks.append(s)
    for s in socks:
        if s.recv(1) != b"x":
            raise SystemExit("a connection was not echoed")
    time.sleep(hold)
    after, after_total = slab(), slab_total()
    for s in socks:
        s.close()
    caches = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in set(after) | set(before)}
    return caches, (after_total - before_total) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bin", default="target/release/ringfwd")
    ap.add_argument("--relays", default="direct,haproxy,uring-copy,uring-auto,tokio")
    ap.add_argument("--hold", type=float, default=3.0,
                    help="seconds the connections sit idle before the reading (the io_uring "
                         "engine parks a direction idle for 1 s)")
    a = ap.parse_args()
    kinds = a.relays.split(",")
    if "haproxy" in kinds and shutil.which("haproxy") is None:
        print("note: haproxy not installed, its row is skipped")
        kinds.remove("haproxy")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 3 * a.conns + 100:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is too low for {a.conns} connections")
    scratch = tempfile.mkdtemp(prefix="slab-")
    echo_port = free_port()
    echo = subprocess.Popen([a.bin, "echo", "--listen", f"127.0.0.1:{echo_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {k: [] for k in kinds}
    try:
        wait_listen(echo_port, echo)
        for rnd in range(a.rounds):
            for kind in kinds:
                port, proc = start_relay(kind, a.bin, echo_port, a.conns, scratch)
                try:
                    caches, total = measure(port, a.conns, a.hold)
                finally:
                    if proc is not None:
                        proc.terminate()
                        proc.wait()
                time.sleep(1.5)
                results[kind].append((caches, total))
                top = sorted((kv for kv in caches.items() if abs(kv[1]) >= 40),
                             key=lambda kv: -abs(kv[1]))[:12]
                print(f"round {rnd} {kind:11} Slab/conn {total:7.0f} B  "
                      + "  ".join(f"{k}={v:.0f}" for k, v in top), flush=True)
    finally:
        echo.terminate()
        echo.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    # Caches a relay's own sockets and its event mechanism live in; the rest is mostly noise.
    watch = ["TCP", "sock_inode_cache", "filp", "eventpoll_epi", "io_kiocb",
             "kmalloc-512", "kmalloc-96"]
    base = statistics.median(t for _, t in results.get("direct", [({}, 0.0)]))
    print(f"\nmedian per connection over {a.rounds} rounds, {a.conns} connections"
          " (bytes; 'added' = Slab minus direct's)")
    print(f"{'relay':11} {'Slab':>7} {'added':>7} " + " ".join(f"{w:>16}" for w in watch))
    for kind in kinds:
        total = statistics.median(t for _, t in results[kind])
        per = [statistics.median(c.get(w, 0) for c, _ in results[kind]) for w in watch]
        print(f"{kind:11} {total:7.0f} {total - base:7.0f} "
              + " ".join(f"{v:16.0f}" for v in per))


if __name__ == "__main__":
    main()
