#!/usr/bin/env python3
"""What a reload costs while older configs drain, per engine, side by side.

For each engine: starts `ringfwd run` (one rule in front of a `ringfwd echo` backend, admin
on), then K times: opens one connection (one byte there and back, then held idle) and
reloads with a changed `idle_timeout` through `POST /reload`. Every reload then leaves one
older generation draining with one live connection, the worst case: K generations alive at
once. Prints the relay's RSS, threads and open fds before and after, and the difference per
draining generation; then releases the connections and shows what is left once every older
generation has drained (they end with their last connection).

    scripts/reload_cost.py [--bin target/release/ringfwd] [--reloads 20]
        [--engines uring,tokio,std]

Figures depend on the machine and the config (`workers`, `[uring] buffers`, `pipes`):
compare engines within one run.
"""
import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field} for {pid}")


def snapshot(pid):
    return {
        "rss_kib": proc_status(pid, "VmRSS"),
        "threads": proc_status(pid, "Threads"),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def read_line(proc, prefix, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"ringfwd exited: {proc.stderr.read()}")
        if line.startswith(prefix):
            return line.strip()
    raise SystemExit(f"no {prefix!r} line within {timeout} s")


def field(line, key):
    for part in line.split():
        if part.startswith(key + "="):
            return part.split("=", 1)[1]
    raise SystemExit(f"no {key}= in {line!r}")


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def reload(admin, config_path, text):
    aside = config_path + ".new"
    with open(aside, "w") as f:
        f.write(text)
    os.rename(aside, config_path)
    req = urllib.request.Request(f"http://{admin}/reload", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read().decode()
    if r.status != 200:
        raise SystemExit(f"reload answered {r.status}: {body}")


def run_engine(binary, engine, reloads, backend):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ringfwd.toml")

        def conf(i):
            return (
                'admin = "127.0.0.1:0"\naccess_log = false\n'
                f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\nupstream = "{backend}"\n'
                f'idle_timeout = "{60 + i}m"\n'
            )

        with open(path, "w") as f:
            f.write(conf(0))
        proc = subprocess.Popen(
            [binary, "run", "--config", path, "--engine", engine],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            admin = field(read_line(proc, "admin addr="), "addr")
            listen = addr(field(read_line(proc, "listening rule="), "addr"))
            held = []

            def hold_one():
                s = socket.create_connection(listen, timeout=10)
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise SystemExit("no echo")
                held.append(s)

            hold_one()
            time.sleep(0.5)
            before = snapshot(proc.pid)
            for i in range(1, reloads + 1):
                reload(admin, path, conf(i))
                time.sleep(0.2)  # the retired generation stops accepting within a tick
                hold_one()
            time.sleep(0.5)
            during = snapshot(proc.pid)
            for s in held:
                s.close()
            time.sleep(2.0)
            after = snapshot(proc.pid)
            return before, during, after
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/ringfwd")
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--engines", default="uring,tokio,std")
    args = ap.parse_args()
    echo = subprocess.Popen(
        [args.bin, "echo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = echo.stdout.readline()
        backend = next(
            (p.split("=", 1)[1] for p in line.split() if p.startswith("addr=")), None
        ) or line.strip().split()[-1]
        k = args.reloads
        print(f"{k} reloads, each leaving one older generation draining with one idle connection")
        print(f"{'engine':8} {'RSS before':>11} {'RSS during':>11} {'per gen':>9} "
              f"{'threads':>13} {'fds':>11} {'RSS drained':>12} {'threads, fds drained':>21}")
        for engine in args.engines.split(","):
            b, d, a = run_engine(args.bin, engine, k, backend)
            per = (d["rss_kib"] - b["rss_kib"]) / k
            print(
                f"{engine:8} {b['rss_kib']:>8} KiB {d['rss_kib']:>8} KiB {per:>6.0f} KiB "
                f"{b['threads']:>5} → {d['threads']:<5} {b['fds']:>4} → {d['fds']:<4} "
                f"{a['rss_kib']:>8} KiB {a['threads']:>10}, {a['fds']:<5}"
            )
    finally:
        echo.terminate()
        echo.wait(timeout=10)


if __name__ == "__main__":
    main()
