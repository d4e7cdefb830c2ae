#!/usr/bin/env python3
"""What the scheduler does to a one-connection round trip through each relay, side by side.

For each placement and relay: a `ringfwd echo` backend, the relay, and `ringfwd bench rr -c 1
--size 64` through it (the round trip of bench.sh's rr1). While the load runs, the script
reads every thread's /proc/PID/task/TID/sched (switches, involuntary switches, migrations)
and stat (the CPU it last ran on) before and after a window, and records the window's
scheduler tracepoints (`perf record -a -e sched:sched_waking,sched:sched_wakeup,
sched:sched_switch,sched:sched_migrate_task`, and `raw_syscalls:sys_enter` for the system
calls each thread makes). From the trace, per thread and per round trip:
how often it was woken, on which CPU it was placed relative to the CPU of the task that
woke it (local: the waker's own CPU; remote: another, which takes an inter-processor
interrupt and, on an idle CPU, its wake from idle), how long from waking to running,
how often it was preempted and migrated, and how many system calls it made (and which).
Needs root and perf; this kernel's /proc/PID/sched
has no wake-up counters without CONFIG_SCHEDSTATS, so the trace supplies them.

Placements: `session` (every process a child of this script: one session, one scheduler
autogroup, as a relay started from the client's login shell), `setsid` (the relay in a
session, and so an autogroup, of its own, as a service manager starts it), `cpu0` (all of
them on CPU 0 with taskset).

    scripts/rr_sched.py [--bin PATH] [--duration 4] [--window 1]
        [--placements session,setsid,cpu0] [--relays direct,nginx,uring,uring-unpinned,tokio]

Relays named uring-… take `pin = false` when the name has `unpinned`, and `wait = "epoll"`
when it has `epoll` (uring-epoll, uring-epoll-unpinned).
"""
import argparse
import collections
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited with {proc.returncode}")
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def threads(pids):
    out = {}
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                out[int(tid)] = pid
        except FileNotFoundError:
            pass
    return out


def sched_counters(tid):
    d = {}
    try:
        with open(f"/proc/{tid}/sched") as f:
            for line in f:
                m = re.match(r"(\S+)\s+:\s+([\d.]+)$", line.strip())
                if m:
                    d[m.group(1)] = float(m.group(2))
        with open(f"/proc/{tid}/comm") as f:
            d["comm"] = f.read().strip()
    except FileNotFoundError:
        return None
    return d


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def start_relay(kind, binary, echo_port, placement, scratch, prefix):
    port = free_port()
    new_session = placement == "setsid"
    if kind == "nginx":
        conf = os.path.join(scratch, f"nginx-{port}.conf")
        load = "load_module /usr/lib/nginx/modules/ngx_stream_module.so;" \
            if os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so") else ""
        with open(conf, "w") as f:
            f.write(f"{load}\nworker_processes 1;\npid {scratch}/nginx-{port}.pid;\n"
                    f"error_log {scratch}/nginx-{port}.err;\ndaemon off;\n"
                    "events { worker_connections 1024; }\n"
                    f"stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{echo_port}; }} }}\n")
        args = ["nginx", "-c", conf, "-p", scratch]
    else:
        engine = "uring" if kind.startswith("uring") else kind
        conf = os.path.join(scratch, f"relay-{port}.toml")
        with open(conf, "w") as f:
            f.write(f'workers = 1\nengine = "{engine}"\naccess_log = false\n[uring]\n')
            if "unpinned" in kind:
                f.write("pin = false\n")
            if "epoll" in kind:
                f.write('wait = "epoll"\n')
            f.write(f'[[rule]]\nname = "echo"\nlisten = "127.0.0.1:{port}"\n'
                    f'upstream = "127.0.0.1:{echo_port}"\n')
        args = [binary, "run", "--config", conf]
    proc = subprocess.Popen(prefix + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=new_session)
    wait_port(port, proc)
    time.sleep(0.2)
    return port, proc


def read_perf(path, tids, roles):
    """Per tid: wake-ups (with waker CPU, placed CPU, waker comm), run delays, preemptions,
    migrations, from the trace."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,tid,cpu,time,event,trace"],
                         capture_output=True, text=True).stdout
    st = {t: collections.Counter() for t in tids}
    delays = {t: [] for t in tids}
    wakers = {t: collections.Counter() for t in tids}
    syscalls = {t: collections.Counter() for t in tids}
    pending = {}
    sys_re = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+raw_syscalls:sys_enter:\s+NR\s+(\d+)")
    line_re = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$")
    for line in out.splitlines():
        m = line_re.match(line)
        if not m:
            sm = sys_re.match(line)
            if sm and int(sm.group(2)) in syscalls:
                syscalls[int(sm.group(2))][SYSCALL_NAMES.get(int(sm.group(5)), sm.group(5))] += 1
            continue
        comm, tid, cpu, ts, ev, rest = m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)), m.group(5), m.group(6)
        kv = dict(re.findall(r"(\w+)=(\S+)", rest))
        if ev == "sched_waking":
            pid = int(kv["pid"])
            if pid in st:
                pending[pid] = (ts, cpu)
                st[pid]["wakeups"] += 1
                wakers[pid][roles.get(tid, comm)] += 1
        elif ev == "sched_wakeup":
            pid = int(kv["pid"])
            if pid in st and pid in pending:
                target = int(kv["target_cpu"])
                st[pid]["local" if target == pending[pid][1] else "remote"] += 1
        elif ev == "sched_switch":
            prev, nxt = int(kv["prev_pid"]), int(kv["next_pid"])
            if prev in st and kv.get("prev_state", "").startswith("R"):
                st[prev]["preempted"] += 1
            if nxt in st and nxt in pending:
                delays[nxt].append((ts - pending.pop(nxt)[0]) * 1e6)
        elif ev == "sched_migrate_task":
            pid = int(kv["pid"])
            if pid in st:
                st[pid]["migrations"] += 1
    return st, delays, wakers, syscalls


# x86-64 numbers of the calls a relay, its peers and the load generator make per round trip.
SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 44: "sendto",
                 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 202: "futex", 232: "epoll_wait",
                 233: "epoll_ctl", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
                 426: "io_uring_enter", 441: "epoll_pwait2"}


def one(kind, placement, a, echo_port, scratch):
    prefix = ["taskset", "-c", "0"] if placement == "cpu0" else []
    relay = None
    target = echo_port
    if kind != "direct":
        target, relay = start_relay(kind, a.bin, echo_port, placement, scratch, prefix)
    out_json = os.path.join(scratch, f"rr-{kind}-{placement}.json")
    client = subprocess.Popen(prefix + [a.bin, "bench", "rr", "-c", "1", "--size", "64", "-d", f"{int(a.duration * 1000)}ms",
                                        "--warmup", "1s", "-q", "--format", "json", "--json", out_json,
                                        f"127.0.0.1:{target}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        relay_pids = [] if relay is None else [relay.pid] + children(relay.pid)
        watched = threads(relay_pids + [client.pid, a.echo_pid])
        before = {t: sched_counters(t) for t in watched}
        perf_out = os.path.join(scratch, f"perf-{kind}-{placement}.data")
        subprocess.run(["perf", "record", "-q", "-a", "-o", perf_out, "-e", "sched:sched_waking",
                        "-e", "sched:sched_wakeup", "-e", "sched:sched_switch",
                        "-e", "sched:sched_migrate_task", "-e", "raw_syscalls:sys_enter",
                        "--", "sleep", str(a.window)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        after = {t: sched_counters(t) for t in watched}
        client.wait(timeout=a.duration + 30)
    finally:
        if client.poll() is None:
            client.kill()
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=10)
    res = json.load(open(out_json))
    role_of = lambda owner: "client" if owner == client.pid else ("echo" if owner == a.echo_pid else "relay")
    st, delays, wakers, calls = read_perf(perf_out, list(watched), {t: role_of(o) for t, o in watched.items()})
    os.unlink(perf_out)
    # Round trips in the window: the load generator sends one request per round trip (one
    # sendto); the run's average rate would overstate the window's, which the syscall
    # tracing slows.
    sent = sum(calls[t]["sendto"] for t, o in watched.items() if o == client.pid)
    rtts = sent if sent else res["req_per_s"] * a.window
    rows = []
    for tid, owner in watched.items():
        b, e = before.get(tid), after.get(tid)
        if not b or not e:
            continue
        sw = e["nr_switches"] - b["nr_switches"]
        if sw < rtts * 0.2:  # threads that take no part in the round trip
            continue
        role = role_of(owner)
        c = st[tid]
        w = max(1, c["wakeups"])
        rows.append({
            "relay": kind, "placement": placement, "p50_us": res.get("p50_us"),
            "role": role, "thread": e["comm"],
            "switches_per_rtt": sw / rtts,
            "involuntary_per_rtt": (e["nr_involuntary_switches"] - b["nr_involuntary_switches"]) / rtts,
            "migrations_per_rtt": (e["se.nr_migrations"] - b["se.nr_migrations"]) / rtts,
            "wakeups_per_rtt": c["wakeups"] / rtts,
            "local_wake_pct": 100 * c["local"] / w,
            "wake_to_run_us": statistics.median(delays[tid]) if delays[tid] else None,
            "preempted_per_rtt": c["preempted"] / rtts,
            "woken_by": ", ".join(f"{k} {100 * v / w:.0f}%" for k, v in wakers[tid].most_common(2)),
            "remote_per_rtt": c["remote"] / rtts,
            "local_per_rtt": c["local"] / rtts,
            "syscalls_per_rtt": sum(calls[tid].values()) / rtts,
            "syscalls": ", ".join(f"{k} {v / rtts:.2f}" for k, v in calls[tid].most_common(3)),
        })
    return res.get("p50_us"), rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    ap.add_argument("--bin", default=f"{target}/release/ringfwd")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--placements", default="session,setsid,cpu0")
    ap.add_argument("--relays", default="direct,nginx,uring,uring-unpinned,tokio")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every relay per placement (order reversed on even rounds); "
                         "the first table gives the median p50")
    ap.add_argument("--json", help="write every row here too")
    a = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf not found (Debian: linux-perf)")
    scratch = tempfile.mkdtemp(prefix="rr-sched-")
    all_rows, summary = [], []
    for placement in a.placements.split(","):
        prefix = ["taskset", "-c", "0"] if placement == "cpu0" else []
        echo_port = free_port()
        echo = subprocess.Popen(prefix + [a.bin, "echo", "--listen", f"127.0.0.1:{echo_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a.echo_pid = echo.pid
        try:
            wait_port(echo_port, echo)
            kinds = a.relays.split(",")
            p50s = {k: [] for k in kinds}
            for rnd in range(a.rounds):
                for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                    p50, rows = one(kind, placement, a, echo_port, scratch)
                    p50s[kind].append(p50)
                    for r in rows:
                        r["round"] = rnd + 1
                    all_rows += rows
                    print(f"{placement:8} {kind:15} round {rnd + 1} p50 {p50} µs", flush=True)
            for kind in kinds:
                mine = [r for r in all_rows if r["placement"] == placement and r["relay"] == kind]
                rounds = max(1, len({r["round"] for r in mine}))
                remote = sum(r["remote_per_rtt"] for r in mine) / rounds
                local = sum(r["local_per_rtt"] for r in mine) / rounds
                summary.append((placement, kind, statistics.median(p50s[kind]), remote, local,
                                ", ".join(f"{v:.0f}" for v in p50s[kind])))
        finally:
            echo.terminate()
            echo.wait(timeout=10)
    direct = {p: v for p, k, v, *_ in summary if k == "direct"}
    print("\n| placement | relay | p50 µs (median) | × direct | per round | wake-ups across CPUs per round trip "
          "| wake-ups on the waker's CPU per round trip |\n|---|---|---|---|---|---|---|")
    for p, k, v, remote, local, rounds in summary:
        ratio = f"{v / direct[p]:.2f}" if direct.get(p) else "–"
        print(f"| {p} | {k} | {v:.1f} | {ratio} | {rounds} | {remote:.2f} | {local:.2f} |")
    print("\nPer round trip, during a window of the run (perf sched tracepoints; /proc/TID/sched):\n")
    print("| placement | relay | round | thread (role) | switches | involuntary | migrations | wake-ups "
          "| placed on the waker's CPU | wake → run µs (p50) | preempted | woken by "
          "| system calls | most made |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        print(f"| {r['placement']} | {r['relay']} | {r['round']} | {r['thread']} ({r['role']}) | {r['switches_per_rtt']:.2f} | "
              f"{r['involuntary_per_rtt']:.2f} | {r['migrations_per_rtt']:.3f} | {r['wakeups_per_rtt']:.2f} | "
              f"{r['local_wake_pct']:.0f} % | {r['wake_to_run_us'] if r['wake_to_run_us'] is None else round(r['wake_to_run_us'], 1)} | "
              f"{r['preempted_per_rtt']:.2f} | {r['woken_by']} | "
              f"{r['syscalls_per_rtt']:.2f} | {r['syscalls']} |")
    if a.json:
        json.dump(all_rows, open(a.json, "w"), indent=1)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
