#!/usr/bin/env python3
"""New TLS handshakes per second against HOST:PORT, each with a server name (SNI).

`openssl s_time -new` has no option to send a server name, and an SNI-routed rule needs one,
so this is its stand-in: --conns threads each loop connect -> full TLS handshake (no session
resumption, no certificate verification: the figure is the handshake's round trips and the
server's work, not a PKI) -> close, for --duration seconds. Prints one JSON object
(handshakes, handshakes per second, handshake time percentiles in µs, errors) and writes it
to --json when given. Standard library only; the handshake itself runs in OpenSSL with the
GIL released, so a few threads keep a local server busy.

    scripts/tls_handshakes.py 127.0.0.1:8443 --sni bench.test --duration 5 --conns 4
"""
import argparse
import json
import socket
import ssl
import sys
import threading
import time


def pct(sorted_values, p):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("--sni", required=True, help="server name sent in the ClientHello")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (bounded run)")
    ap.add_argument("--conns", type=int, default=4, help="concurrent handshaking threads")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # No session cache: every connection is a full handshake.
    ctx.options |= ssl.OP_NO_TICKET
    lock = threading.Lock()
    times, errors = [], [0]
    deadline = time.monotonic() + a.duration

    def worker():
        mine, errs = [], 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                with socket.create_connection((host, int(port)), timeout=5) as raw:
                    with ctx.wrap_socket(raw, server_hostname=a.sni) as tls:
                        tls.do_handshake()
                mine.append((time.monotonic() - t0) * 1e6)
            except (OSError, ssl.SSLError):
                errs += 1
                time.sleep(0.01)
        with lock:
            times.extend(mine)
            errors[0] += errs

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(a.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    times.sort()
    result = {
        "mode": "tls_handshakes", "target": a.target, "sni": a.sni, "connections": a.conns,
        "duration_s": round(elapsed, 3), "requests": len(times),
        "req_per_s": round(len(times) / elapsed, 1) if elapsed > 0 else None,
        "p50_us": round(pct(times, 50), 1) if times else None,
        "p99_us": round(pct(times, 99), 1) if times else None,
        "errors": errors[0],
    }
    text = json.dumps(result)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0 if times else 1


if __name__ == "__main__":
    sys.exit(main())
