#!/usr/bin/python3
"""The legitimate client of bench/attacks: every --interval seconds, a fresh TLS connection from
--src (HTTP/1.1, the test CA trusted) asks GET /healthz and must get `200 ok` within 5 s.
Prints one JSON line: requests, failures, and the latency percentiles in milliseconds."""

import argparse
import json
import socket
import ssl
import time


def once(args, ctx):
    """One request on a new connection: its latency in seconds, or None if it failed."""
    start = time.perf_counter()
    try:
        with socket.create_connection((args.host, args.port), timeout=5, source_address=(args.src, 0)) as tcp:
            with ctx.wrap_socket(tcp, server_hostname=args.sni) as tls:
                tls.sendall(f"GET /healthz HTTP/1.1\r\nhost: {args.sni}\r\nconnection: close\r\n\r\n".encode())
                answer = b""
                while not answer.endswith(b"\r\n\r\nok") and (chunk := tls.recv(4096)):
                    answer += chunk
    except OSError:
        return None
    ok = answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nok")
    return time.perf_counter() - start if ok else None


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="relay.test")
    p.add_argument("--ca", required=True)
    p.add_argument("--src", default="127.0.0.2")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    until = time.monotonic() + args.seconds
    times, failures = [], 0
    while time.monotonic() < until:
        began = time.monotonic()
        t = once(args, ctx)
        if t is None:
            failures += 1
        else:
            times.append(t * 1000)
        time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    times.sort()

    def pct(q):
        return round(times[min(len(times) - 1, int(q / 100 * len(times)))], 2) if times else None

    print(json.dumps({"requests": len(times) + failures, "failures": failures, "p50": pct(50), "p99": pct(99), "max": pct(100)}))


if __name__ == "__main__":
    main()
