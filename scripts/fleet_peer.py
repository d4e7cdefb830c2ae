#!/usr/bin/env python3
"""The ends of scripts/fleet.sh's fleet: backends that name themselves, the clients, and the
per-scenario summaries. Standard library only; run inside the fleet's namespaces.

  backend NAME IP:PORT            serve: say "NAME PEER_IP\\n" on every connection, then echo
  load OUT --vip IP:PORT --clients IP,IP,.. [--hold N] [--rate R] --stop FILE
                                  held connections (echoing every 50 ms) plus new short
                                  sessions at R per second, until FILE exists; then every
                                  held connection ends gracefully; records go to OUT (JSON)
  round OUT --vip IP:PORT --clients IP,.. --per-client K
                                  K short sessions from every client address, in parallel
  summary SCENARIO FACTS.json RESULTS.json..   one JSON line on stdout (see fleet.sh)
  down ADMIN_JSON MEMBER          exit 0 if /upstreams (stdin) shows MEMBER down

A session: connect (1 s timeout), read the backend's line (which backend, and through which
host: the host's address on the backend network), send a random payload, read it back,
compare byte for byte. A held connection repeats the payload exchange until told to stop,
then shuts its side down and waits for the end of stream.
"""

import json
import os
import random
import socket
import sys
import threading
import time

CONNECT_TIMEOUT = 1.0
IO_TIMEOUT = 5.0


def now_ms():
    return int(time.time() * 1000)


def backend(name, listen):
    ip, port = listen.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, int(port)))
    srv.listen(1024)

    def serve(c, peer):
        try:
            c.settimeout(120)
            c.sendall(f"{name} {peer[0]}\n".encode())
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, peer = srv.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()


def read_line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise OSError("closed before the backend's line")
        buf += b
        if len(buf) > 200:
            raise OSError("no line from the backend")
    return buf.decode().split()


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise OSError(f"end of stream after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def open_session(client, vip):
    """Connects from `client`; returns (socket, record) or (None, record) on failure."""
    rec = {"client": client, "start": now_ms()}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((client, 0))
        rec["sport"] = s.getsockname()[1]
        s.settimeout(CONNECT_TIMEOUT)
        s.connect(vip)
        s.settimeout(IO_TIMEOUT)
        name, via = read_line(s)
        rec["backend"], rec["via"] = name, via
        return s, rec
    except ConnectionRefusedError:
        rec["error"] = "refused"
    except socket.timeout:
        rec["error"] = "timeout"
    except OSError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = now_ms()
    s.close()
    return None, rec


def exchange(s, rng):
    payload = rng.randbytes(rng.randint(1, 4096))
    s.sendall(payload)
    if recv_exact(s, len(payload)) != payload:
        raise OSError("echo differs from what was sent")
    return len(payload)


def short_session(client, vip, rng):
    s, rec = open_session(client, vip)
    if s is None:
        return rec
    try:
        rec["bytes"] = exchange(s, rng)
        s.shutdown(socket.SHUT_WR)
        if s.recv(1) != b"":
            raise OSError("data after the echo")
        rec["ok"] = True
    except socket.timeout:
        rec["error"] = "timeout"
    except OSError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = now_ms()
        s.close()
    return rec


def held_session(client, vip, stop, rng, out):
    s, rec = open_session(client, vip)
    rec["held"] = True
    out.append(rec)
    if s is None:
        return
    rec["bytes"] = 0
    try:
        while not stop.is_set():
            rec["bytes"] += exchange(s, rng)
            stop.wait(0.05)
        rec["bytes"] += exchange(s, rng)
        s.shutdown(socket.SHUT_WR)
        if s.recv(1) != b"":
            raise OSError("data after the last echo")
        rec["ok"] = True
    except socket.timeout:
        rec["error"] = "timeout"
    except OSError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = now_ms()
        s.close()


def parse_vip(text):
    ip, port = text.rsplit(":", 1)
    return (ip, int(port))


def opt(args, name, default=None):
    if name in args:
        return args[args.index(name) + 1]
    if default is None:
        sys.exit(f"fleet_peer: {name} is required")
    return default


def load(out_path, args):
    vip = parse_vip(opt(args, "--vip"))
    clients = opt(args, "--clients").split(",")
    hold = int(opt(args, "--hold", "0"))
    rate = float(opt(args, "--rate", "0"))
    stop_file = opt(args, "--stop")
    stop = threading.Event()
    records = []
    lock = threading.Lock()
    threads = []
    for i in range(hold):
        rng = random.Random(i)
        t = threading.Thread(
            target=held_session,
            args=(clients[i % len(clients)], vip, stop, rng, records),
        )
        t.start()
        threads.append(t)

    def stream(k, workers):
        rng = random.Random(1000 + k)
        n = k
        period = workers / rate
        nxt = time.monotonic()
        while not stop.is_set():
            rec = short_session(clients[n % len(clients)], vip, rng)
            with lock:
                records.append(rec)
            n += workers
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))

    if rate > 0:
        workers = max(1, min(16, int(rate // 5)))
        for k in range(workers):
            t = threading.Thread(target=stream, args=(k, workers))
            t.start()
            threads.append(t)
    # Readiness for the orchestrator: every held connection has its backend line (or failed).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        len([r for r in records if r.get("held") and ("backend" in r or "error" in r)]) < hold
    ):
        time.sleep(0.02)
    with open(out_path + ".ready", "w") as f:
        f.write("ready\n")
    while not os.path.exists(stop_file):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    with open(out_path, "w") as f:
        json.dump(records, f)


def round_(out_path, args):
    vip = parse_vip(opt(args, "--vip"))
    clients = opt(args, "--clients").split(",")
    per = int(opt(args, "--per-client", "4"))
    jobs = [c for c in clients for _ in range(per)]
    records = []
    lock = threading.Lock()

    def work(k):
        rng = random.Random(k)
        while True:
            with lock:
                if not jobs:
                    return
                c = jobs.pop()
            rec = short_session(c, vip, rng)
            with lock:
                records.append(rec)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out_path, "w") as f:
        json.dump(records, f)


def host_of(rec, hosts):
    return hosts.get(rec.get("via"), "?")


def mapping(records):
    """client address -> set of backends chosen for it."""
    m = {}
    for r in records:
        if r.get("ok"):
            m.setdefault(r["client"], set()).add(r["backend"])
    return m


def summary(scenario, facts_path, result_paths):
    with open(facts_path) as f:
        facts = json.load(f)
    records = []
    for p in result_paths:
        with open(p) as f:
            records += json.load(f)
    hosts = facts.pop("hosts_by_addr")
    out = {"scenario": scenario}
    held = [r for r in records if r.get("held")]
    new = [r for r in records if not r.get("held")]
    per_host = {}
    for r in records:
        if r.get("ok"):
            h = host_of(r, hosts)
            per_host[h] = per_host.get(h, 0) + 1
    out["connections"] = len(records)
    out["ok"] = sum(1 for r in records if r.get("ok"))
    out["failed"] = len(records) - out["ok"]
    out["per_host"] = dict(sorted(per_host.items()))
    if held:
        out["held"] = len(held)
        out["held_failed"] = sum(1 for r in held if not r.get("ok"))
    if new:
        out["new"] = len(new)
        out["new_refused"] = sum(1 for r in new if r.get("error") == "refused")
        out["new_failed"] = sum(1 for r in new if not r.get("ok"))
    target = facts.get("target")
    if target and held:
        mine = [r for r in held if host_of(r, hosts) == target]
        others = [r for r in held if "via" in r and host_of(r, hosts) != target]
        out["held_on_target"] = len(mine)
        out["held_on_target_failed"] = sum(1 for r in mine if not r.get("ok"))
        out["held_elsewhere"] = len(others)
        out["held_elsewhere_failed"] = sum(1 for r in others if not r.get("ok"))
    if scenario == "crash" and new:
        t_withdrawn = facts["withdrawn_at"]
        after = [r for r in new if r["start"] >= t_withdrawn]
        out["new_after_withdrawal"] = len(after)
        out["new_failed_after_withdrawal"] = sum(1 for r in after if not r.get("ok"))
        out["new_failed_before_withdrawal"] = out["new_failed"] - out["new_failed_after_withdrawal"]
    m = mapping(records)
    out["clients"] = len(m)
    out["clients_one_backend"] = sum(1 for v in m.values() if len(v) == 1)
    hosts_per_client = {}
    for r in records:
        if r.get("ok"):
            hosts_per_client.setdefault(r["client"], set()).add(host_of(r, hosts))
    out["clients_on_several_hosts"] = sum(1 for v in hosts_per_client.values() if len(v) > 1)
    before_path = facts.pop("mapping_before", None)
    if before_path:
        with open(before_path) as f:
            before = {c: set(v) for c, v in json.load(f).items()}
        lost = facts["lost_backend"]
        moved = [c for c in m if c in before and m[c] != before[c]]
        out["clients_on_lost_backend"] = sum(1 for c in before if lost in before[c])
        out["clients_moved"] = len(moved)
        out["clients_moved_not_from_lost"] = sum(1 for c in moved if lost not in before[c])
        out["lost_backend_still_chosen"] = sum(1 for v in m.values() if lost in v)
    if "save_mapping" in facts:
        with open(facts.pop("save_mapping"), "w") as f:
            json.dump({c: sorted(v) for c, v in m.items()}, f)
    errors = {}
    for r in records:
        if not r.get("ok"):
            e = r.get("error", "?").split(":")[0]
            errors[e] = errors.get(e, 0) + 1
    if errors:
        out["errors"] = errors
    facts.pop("withdrawn_at", None)
    out.update(facts)
    print(json.dumps(out, sort_keys=False))


def down(member):
    doc = json.load(sys.stdin)
    for pool in doc["rules"]:
        for m in pool["members"]:
            if m["addr"] == member:
                sys.exit(0 if not m["up"] else 1)
    sys.exit(2)


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd = a[0]
    if cmd == "backend":
        backend(a[1], a[2])
    elif cmd == "load":
        load(a[1], a[2:])
    elif cmd == "round":
        round_(a[1], a[2:])
    elif cmd == "summary":
        summary(a[1], a[2], a[3:])
    elif cmd == "down":
        down(a[1])
    else:
        sys.exit(f"fleet_peer: unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main()
